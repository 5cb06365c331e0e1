"""UALMModel: the NeMo model class. Orchestration only: the engine owns the math, the strategy the groups."""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from megatron.core import parallel_state
from omegaconf import DictConfig, OmegaConf

from nemo.core.classes import ModelPT
from ualm_nemo.data.microbatch import MicroBatch
from ualm_nemo.data.stream import DataPosition, GlobalBatchStream, own_generator
from ualm_nemo.distributed.checkpoint_check import find_resumable
from ualm_nemo.distributed.parallel import comm_device
from ualm_nemo.training import watchdog
from ualm_nemo.training.engine import MegatronEngine
from ualm_nemo.training.nemo_archive import UALMSaveRestoreConnector
from ualm_nemo.training.run_config import RunConfig, recorded_run_config


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses: the run stops instead of burning cluster time."""


class _SteppedByEngine(torch.optim.Optimizer):
    """Lightning's handle on the Megatron optimizer. ``step`` only advances Lightning's step counter: the
    Megatron optimizer already stepped inside ``MegatronEngine.train_step``; its state is checkpointed by the
    strategy, so this handle has none of its own."""

    def __init__(self, engine: MegatronEngine) -> None:  # no super().__init__: there are no params to own here
        self.engine, self.defaults, self.state = engine, {}, {}

    @property
    def param_groups(self):
        return self.engine.optimizer.param_groups

    def step(self, closure=None):
        return closure() if closure is not None else None

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


def _as_is(item):
    """collate_fn that leaves a step's micro-batches untouched (the loader already built them)."""
    return item


class _WithReference:
    """Pair batches with the offline reference's log-probs attached (online: the engine adds them per step)."""

    def __init__(self, collate, table: dict | None) -> None:
        self.collate, self.table = collate, table

    def __call__(self, items) -> MicroBatch:
        from ualm_nemo.training.dpo_reference import attach

        batch = self.collate(items)
        return attach(batch, self.table) if self.table is not None else batch


@dataclasses.dataclass
class StepBatch:
    """One optimizer step's data, whichever loader made it: this DP rank's micro-batches, how many samples they
    hold, and (Shar) the loader's position after them, which a checkpoint saves (Lightning prefetches, so the
    loader itself is already further on). Lightning's default transfer moves it (dataclasses all the way down)."""

    microbatches: list[MicroBatch]
    samples: int
    loader_state: dict | None = None


class StepGroups(torch.utils.data.IterableDataset):
    """Shar: the token-budget micro-batch stream grouped ``n`` at a time, one StepBatch per optimizer step."""

    def __init__(self, microbatches, n: int) -> None:
        self.microbatches, self.n = microbatches, n

    def __iter__(self):
        stream = iter(self.microbatches)
        while len(group := list(itertools.islice(stream, self.n))) == self.n:
            yield StepBatch(group, sum(len(mb.ids) for mb in group), group[-1].loader_state)


class GlobalBatchSteps(torch.utils.data.IterableDataset):
    """Manifests / demo: this DP rank's share of each global batch split into ``n`` micro-batches, a StepBatch
    per optimizer step (GlobalBatchStream gives every rank exactly global_batch_size / DP samples)."""

    def __init__(self, stream: GlobalBatchStream, n: int, samples: int, audio_in_id: int) -> None:
        self.stream, self.n, self.samples, self.audio_in_id = stream, n, samples, audio_in_id

    def __iter__(self):
        for batch in self.stream:
            yield StepBatch(batch.split(self.n, self.audio_in_id), self.samples)


def _recorded_tokenizer(spec: str) -> str:
    """``data.tokenizer`` as the checkpoint records it: ``byte``, or the folder made absolute (an export run from
    another directory still finds it)."""
    return "byte" if str(spec) == "byte" else os.path.abspath(str(spec))


_NEMO_KEYS = ("target", "nemo_version")  # what ModelPT adds to a cfg: no part of the run


def run_to_cfg(run: RunConfig) -> DictConfig:
    """The run as NeMo's ``cfg``: plain data, the model section under ``ualm`` (NeMo forbids a key ``model``)."""
    record = dataclasses.asdict(run)
    record["ualm"] = record.pop("model")
    return OmegaConf.create(record)


def run_from_cfg(cfg: DictConfig) -> RunConfig:
    """The inverse of :func:`run_to_cfg` (a restored ``.nemo``'s ``model_config.yaml``), parsed as every run is
    (ConfigError naming the key)."""
    from ualm_nemo.training.run_config import run_config_from_dict

    record = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in _NEMO_KEYS}
    if "ualm" not in record:
        raise ValueError("this NeMo config has no 'ualm' section: it was not written by UALMModel")
    record["model"] = record.pop("ualm")
    return run_config_from_dict(record)


class UALMModel(ModelPT):
    """The NeMo model of one run, built from its parsed RunConfig (training/run_config.py parses the YAML once).

    NeMo's own ``cfg`` is the run as plain data (:func:`run_to_cfg`); NeMo's restore path builds the model from
    it (``UALMModel(cfg=...)``). ``save_to`` / ``restore_from`` write and read ``.nemo`` archives whose weights
    are a sharded Megatron checkpoint (training/nemo_archive.py)."""

    def __init__(self, run: RunConfig | None = None, trainer: Trainer | None = None,
                 cfg: DictConfig | None = None) -> None:
        if (run is None) == (cfg is None):
            raise TypeError("UALMModel takes a RunConfig (run=) or NeMo's cfg (cfg=), exactly one of them")
        run = run if run is not None else run_from_cfg(cfg)
        super().__init__(cfg=run_to_cfg(run), trainer=trainer)
        self._save_restore_connector = UALMSaveRestoreConnector()
        self.run = run
        self.automatic_optimization = False
        self.engine: MegatronEngine | None = None
        self.position = DataPosition()  # the loader's cursor (runs a batch ahead: Lightning prefetches)
        self.trained_samples = 0  # samples consumed by finished steps: what a resume continues from
        self.nonfinite_in_a_row = 0
        self.skipped_steps = 0
        self.loss_history: list[tuple[int, float]] = []  # (step, loss) of this process's run, for logs and tests
        self.last_result = None  # the last trained step's result; None when this job trained nothing (finished)
        self.train_dataset = None  # the map-style demo/manifest data set (built in setup)
        self.data_state: dict | None = None  # Shar loader position after the last trained micro-batch
        self.pending_loader_state: dict | None = None  # restored from a checkpoint, applied to the new loader
        self.reference_table: dict | None = None  # DPO offline reference: pair id -> [2, N] log-probs
        self.val_batches: list | None = None  # this DP rank's held-out micro-batches (built at the first validation)
        self.last_validation: dict | None = None  # {"step", **figures} of the newest validation (checkpointed)
        self.evaluator = None  # training/evaluation.TrainingEvaluator (built at the first evaluation)
        self.last_evaluation: dict | None = None  # {"step", **figures} of the newest evaluation (checkpointed)

    # --- set-up ---------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Runs on every rank once torch.distributed is up (data synthesis/caching coordinate through it)."""
        if stage == "fit" and self.train_dataset is None and self.run.data.shar is None:
            from ualm_nemo.training.data_setup import build_train_dataset

            self.train_dataset, self.rejects = build_train_dataset(self.run.data, self.run.model, self.run.output_dir)
            if self.run.dpo is not None and self.run.dpo.reference == "offline":
                self.reference_table = self._offline_reference()
        super().setup(stage)

    def _offline_reference(self) -> dict:
        from ualm_nemo.training.dpo_reference import check_coverage, fingerprint, load_sidecar, reference_step

        dpo, data = self.run.dpo, self.run.data
        # a reference run folder resolves to its newest iteration: its step tells a sidecar scored before it trained on
        step = reference_step(dpo.reference_checkpoint) if dpo.reference_checkpoint else None
        expected = fingerprint(dpo.reference_checkpoint, step, data.dpo_manifest, data.tokenizer,
                               self.run.model.vocab.text_vocab_size, self.run.model.vocab.num_codebooks)
        table = load_sidecar(dpo.reference_logps, expected)
        check_coverage(table, [r.id for r in self.train_dataset.records], dpo.reference_logps)
        return table

    def configure_model(self) -> None:
        if self.engine is None:
            # every weight comes from a checkpoint when resuming or starting from train.init_from: skip the random
            # initialisation (the engine refuses to train if no load happened after all)
            resuming = find_resumable(Path(self.run.output_dir) / "checkpoints") is not None
            self._build_engine(initialize=not (resuming or self.run.train.init_from), train=True)
            self._maybe_init_weights(resuming)

    def _build_engine(self, initialize: bool, train: bool) -> None:
        self.engine = MegatronEngine(self.run.model, self.run.optim, self.run.train.max_steps,
                                     stage=self.run.train.stage, train=train, initialize=initialize,
                                     objective=self._objective())
        self.chunks = torch.nn.ModuleList(self.engine.chunks)  # visible to Lightning (summary, device moves)
        if train and self.run.dpo is not None and self.run.dpo.reference == "online":
            from ualm_nemo.training.dpo_reference import load_reference_model

            self.engine.set_reference(load_reference_model(self.run.model, self.run.dpo.reference_checkpoint))

    # --- .nemo archives (training/nemo_archive.py) --------------------------------------------------
    def save_to(self, save_path: str) -> str | None:
        """Write ``save_path`` (a ``.nemo``): collective, every rank calls it (each writes its own shards).
        NeMo's ModelPT.save_to calls the connector on rank 0 only, which cannot save a sharded model."""
        return self._save_restore_connector.save_to(self, save_path)

    @classmethod
    def restore_from(cls, restore_path: str, override_config_path=None, map_location=None, strict: bool = True,
                     return_config: bool = False, save_restore_connector=None, trainer: Trainer | None = None,
                     validate_access_integrity: bool = True):
        """NeMo's restore with the UALM connector. With a ``trainer`` the model comes back ready to train on
        (optimizer built, fresh; step 0, as train.init_from); without, for inference (no optimizer)."""
        return super().restore_from(restore_path, override_config_path, map_location, strict, return_config,
                                    save_restore_connector or UALMSaveRestoreConnector(), trainer,
                                    validate_access_integrity)

    def archive_extra(self) -> dict[str, Any]:
        """What an archive records beside the weights (the exporter reads the tokenizer from it)."""
        return {"tokenizer": _recorded_tokenizer(self.run.data.tokenizer), "consumed_samples": self.trained_samples}

    def load_archive_weights(self, weights: Path) -> None:
        """Build the engine at this process's layout (set up here on a bare process) and load ``weights``."""
        self._set_up_restore_layout()
        self._build_engine(initialize=False, train=self._trainer is not None)
        self.engine.load_initial_weights(str(weights))

    def _set_up_restore_layout(self) -> None:
        """A process that already set up Megatron (a job, a test) restores at its layout, which must be the
        config's; a bare process sets it up: TP1/PP1 on one process (any archive opens there), else the config's."""
        from ualm_nemo.distributed.parallel import init_distributed, init_model_parallel

        wanted = self.run.model.parallel
        if parallel_state.model_parallel_is_initialized():
            have = (parallel_state.get_tensor_model_parallel_world_size(),
                    parallel_state.get_pipeline_model_parallel_world_size())
            if have != (wanted.tensor_model_parallel_size, wanted.pipeline_model_parallel_size):
                raise ValueError(f"this process is set up for TP{have[0]}/PP{have[1]}, the archive's config says "
                                 f"TP{wanted.tensor_model_parallel_size}/PP{wanted.pipeline_model_parallel_size}: "
                                 "pass override_config_path with ualm.parallel set to this layout (the weights "
                                 "load at any layout)")
            return
        init_distributed()
        if torch.distributed.get_world_size() == 1:
            model = self.run.model.without_training_features().with_parallel(
                tensor_model_parallel_size=1, pipeline_model_parallel_size=1, sequence_parallel=False)
            self.run = dataclasses.replace(self.run, model=model)
        init_model_parallel(self.run.model.parallel, seed=self.run.model.seed)

    def _objective(self):
        if self.run.dpo is None:
            return None  # the LM loss
        from ualm_nemo.training.objectives import DPOObjective

        return DPOObjective(self.run.dpo, self.run.model.vocab)

    def _maybe_init_weights(self, resuming: bool) -> None:
        """A new run may start from converted weights (train.init_from); a resumed run never does."""
        init_from = self.run.train.init_from
        if init_from and not resuming:
            self.engine.load_initial_weights(init_from)

    def configure_optimizers(self):
        if self.engine is not None and self.engine.optimizer is None:
            raise RuntimeError("this UALMModel was restored for inference (no optimizer): pass trainer= to "
                               "UALMModel.restore_from to train it")
        return _SteppedByEngine(self.engine)

    def train_dataloader(self):
        if self.run.data.shar is not None:
            return self._shar_dataloader()
        if self.train_dataset is None:
            raise RuntimeError("UALMModel.train_dataset is not set (examples/train.py builds it from cfg.data)")
        from ualm_nemo.data.dataset import Collator

        collate = Collator(self.run.model.vocab)
        if self.run.dpo is not None:
            from ualm_nemo.data.posttrain_dataset import PairCollator

            collate = _WithReference(PairCollator(self.run.model.vocab), self.reference_table)
        dp = parallel_state.get_data_parallel_world_size()
        stream = GlobalBatchStream(self.train_dataset, collate, self.run.train.global_batch_size,
                                   parallel_state.get_data_parallel_rank(), dp, self.run.data.seed, self.position)
        steps = GlobalBatchSteps(stream, self.num_microbatches(), self.run.train.global_batch_size // dp,
                                 self.run.model.vocab.audio_in_id)
        return torch.utils.data.DataLoader(steps, batch_size=None, num_workers=0, collate_fn=_as_is,
                                           generator=own_generator())

    def _shar_dataloader(self):
        """Token-budget (optionally packed) micro-batches from Shar sources, grouped per step; exact resume."""
        from ualm_nemo.data.formatting import SampleFormatter
        from ualm_nemo.data.shar_dataset import SharBatchLoader
        from ualm_nemo.data.tokenizer import build_tokenizer

        data = self.run.data
        formatter = SampleFormatter.from_config(build_tokenizer(data.tokenizer), self.run.model,
                                                cfg_dropout=data.cfg_dropout)
        loader = SharBatchLoader(data.shar, formatter, parallel_state.get_data_parallel_rank(),
                                 parallel_state.get_data_parallel_world_size())
        if self.pending_loader_state is not None:  # set by restore_extra: continue at the next micro-batch
            loader.load_state_dict(self.pending_loader_state)
        return torch.utils.data.DataLoader(StepGroups(loader, self.num_microbatches()), batch_size=None,
                                           collate_fn=_as_is, generator=own_generator())

    def setup_training_data(self, train_data_config) -> None:
        pass  # the data path is built from cfg.data by the entry script (see train_dataloader)

    def setup_validation_data(self, val_data_config) -> None:
        pass

    @classmethod
    def list_available_models(cls) -> list:
        return []  # no hub: weights are always local paths

    # --- training -------------------------------------------------------------------------------
    def num_microbatches(self) -> int:
        t = self.run.train
        return t.global_batch_size // (t.micro_batch_size * parallel_state.get_data_parallel_world_size())

    def training_step(self, step: StepBatch, batch_idx: int) -> None:
        if step.loader_state is not None:
            self.data_state = step.loader_state  # after this step's data (Lightning prefetches ahead)
        self.trained_samples += self._global_count(step.samples)
        result = self.engine.train_step(step.microbatches)
        if math.isfinite(result.loss):
            self.nonfinite_in_a_row = 0
        else:
            self.nonfinite_in_a_row += 1
            if self.nonfinite_in_a_row >= self.run.train.max_consecutive_nonfinite:
                raise NonFiniteLossError(f"{self.nonfinite_in_a_row} non-finite losses in a row at step "
                                         f"{self.engine.step} (train.max_consecutive_nonfinite)")
        self.skipped_steps += int(result.skipped)
        self.optimizers().step()  # Lightning's step counter (see _SteppedByEngine)
        self.last_result = result
        self.loss_history.append((self.engine.step, result.loss))
        self._log_step(result)
        every = self.run.train.val_every_n_steps
        if every and self.engine.step % every == 0:
            with watchdog.section(f"validation at step {self.engine.step}", "long"):
                self._validate()
        every = self.run.train.eval_every_n_steps
        if every and self.engine.step % every == 0:
            with watchdog.section(f"evaluation at step {self.engine.step}", "long"):
                self._evaluate()

    def _log_step(self, result) -> None:
        """TensorBoard at the engine's step, given explicitly: Lightning's own step counter for logging is not part
        of our checkpoints, so after a resume its series ran one step early (step k held two values)."""
        step, t = self.engine.step, self.run.train
        if self.logger is None or not self.trainer.is_global_zero:
            return
        if step % t.log_every_n_steps and step != t.max_steps:
            return
        metrics = {"train/loss": result.loss, "train/lr": result.lr, "train/skipped_steps": self.skipped_steps,
                   "train/grad_norm": result.grad_norm if result.grad_norm is not None else float("nan")}
        if result.metrics is not None:
            metrics.update(result.metrics.as_log())
        for logger in self.loggers:  # TensorBoard and, with logger.wandb, W&B
            logger.log_metrics(metrics, step=step)

    def _validate(self) -> None:
        """Score the fixed held-out set (training/validation.py) on every rank together; rank 0 logs the figures
        to TensorBoard at this step and appends them to ``<output_dir>/validation.jsonl``."""
        from lightning.pytorch.utilities import move_data_to_device

        from ualm_nemo.training.validation import ValidationLog, ValidationLoss, build_val_batches

        if self.val_batches is None:
            self.val_batches = build_val_batches(self.run, parallel_state.get_data_parallel_rank(),
                                                 parallel_state.get_data_parallel_world_size())
        objective = ValidationLoss(self.run.model.vocab.num_codebooks)
        total = self.engine.evaluate(move_data_to_device(self.val_batches, self.device), objective)
        figures = objective.summarise(total)
        step = self.engine.step
        self.last_validation = {"step": step, **figures}
        if not self.trainer.is_global_zero:
            return
        ValidationLog(self.run.output_dir).append(step, figures)
        for logger in self.loggers:
            logger.log_metrics({f"val/{k}": v for k, v in figures.items() if k.startswith("loss")}, step=step)

    def _evaluate(self) -> None:
        """Generate for the fixed eval set with the training model and score it (training/evaluation.py) on every
        rank together; rank 0 logs ``eval/*`` to TensorBoard and appends to ``<output_dir>/evaluation.jsonl``."""
        from ualm_nemo.training.evaluation import TB_KEYS, EvaluationLog, TrainingEvaluator

        if self.evaluator is None:
            self.evaluator = TrainingEvaluator(self.run)
        step = self.engine.step
        figures = self.evaluator(self.engine.decoding_model(), step)
        self.last_evaluation = {"step": step, **figures}
        if not self.trainer.is_global_zero:
            return
        EvaluationLog(self.run.output_dir).append(step, figures)
        scalars = {f"eval/{k}": v for k, v in figures.items()
                   if v is not None and (k in TB_KEYS or k.startswith("qa_accuracy_"))}
        for logger in self.loggers:
            logger.log_metrics(scalars, step=step)

    @staticmethod
    def _global_count(local: int) -> int:
        count = torch.tensor([local], dtype=torch.long, device=comm_device())
        torch.distributed.all_reduce(count, group=parallel_state.get_data_parallel_group())
        return int(count)

    # --- checkpoint extras ----------------------------------------------------------------------
    def checkpoint_extra(self) -> dict[str, Any]:
        extra = {"consumed_samples": self.trained_samples, "skipped_steps": self.skipped_steps,
                 "validation": self.last_validation, "evaluation": self.last_evaluation,
                 "tokenizer": _recorded_tokenizer(self.run.data.tokenizer),  # what the HF export carries
                 "run_config": recorded_run_config(self.run)}  # the export's model card shows it
        if self.run.data.shar is not None:  # one loader position per DP rank, all saved by rank 0
            states = [None] * parallel_state.get_data_parallel_world_size()
            torch.distributed.all_gather_object(states, self.data_state,
                                                group=parallel_state.get_data_parallel_group())
            extra["shar_loader_states"] = states
        return extra

    def restore_extra(self, state: dict[str, Any]) -> None:
        states = state.get("shar_loader_states")
        if states is not None:
            if len(states) != parallel_state.get_data_parallel_world_size():
                raise ValueError(f"the checkpoint's loader states are for {len(states)} data-parallel ranks, this "
                                 f"run has {parallel_state.get_data_parallel_world_size()}: an exact data resume "
                                 "needs the same DP size (the weights reshard; the Shar loader does not)")
            self.pending_loader_state = states[parallel_state.get_data_parallel_rank()]
        self.trained_samples = int(state.get("consumed_samples", 0))
        self.position.consumed_samples = self.trained_samples
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.last_validation = state.get("validation")
        self.last_evaluation = state.get("evaluation")
