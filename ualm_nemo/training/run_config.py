"""The run configuration: Hydra/OmegaConf YAML in, validated dataclasses out.

YAML (conf/) stays the user's interface (``python examples/train.py model=qwen2.5-7b stage=align ...``); this
module turns each section into its dataclass, rejecting unknown keys and values of the wrong type with the full
dotted key (config_types.py), and validates the whole run before any process group or model exists.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from ualm_nemo.distributed.optim import OptimConfig
from ualm_nemo.training.dpo import DPOConfig
from ualm_nemo.config_types import Problems, build_section
from ualm_nemo.data.blend import SourceSpec
from ualm_nemo.data.shar_config import SharLoaderConfig, source_specs
from ualm_nemo.model.config import ConfigError, UALMConfig
from ualm_nemo.training.eval_config import EvalConfig
from ualm_nemo.training.loggers import LoggerConfig, logger_config
from ualm_nemo.training.stages import STAGES

log = logging.getLogger(__name__)

VAL_MANIFEST_KEYS = ("val_tta_manifest", "val_understanding_manifest", "val_text_manifest")


@dataclass(kw_only=True)
class TrainConfig:
    stage: str = "pretrain"
    max_steps: int = 300
    global_batch_size: int = 8
    micro_batch_size: int = 4
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 100
    keep_last_checkpoints: int = 3
    async_save: bool = True  # write checkpoints in the background; `latest` moves once complete (async_save.py)
    max_consecutive_nonfinite: int = 5
    stop_at_step: int | None = None  # end this job here (checkpoint first), as a time-limited job would
    init_from: str | None = None  # weights to start a new run from (e.g. an HF import); ignored when resuming
    val_every_n_steps: int | None = None  # score the held-out data (data.val_*) every N steps; None: never
    val_batches: int = 8  # held-out micro-batches per data-parallel rank, the same ones at every validation
    eval_every_n_steps: int = 0  # generate for the eval set (the eval section) and score it every N steps; 0: never
    seed: int = 1234
    # hang detection (training/watchdog.py): a rank with no progress this long ends itself so every rank stops and
    # the job restarts from the latest checkpoint; 0 turns it off
    hang_timeout_s: float = 900.0  # one optimizer step (validation and evaluation: startup_timeout_s)
    startup_timeout_s: float = 3600.0  # model build + checkpoint load + the first step; validation; evaluation
    save_timeout_s: float = 3600.0  # one checkpoint save


@dataclass(kw_only=True)
class DataConfig:
    tokenizer: str = "byte"  # "byte" (tiny demo) or a local Qwen tokenizer folder
    codec_path: str | None = None  # local X-Codec folder; None builds the tiny random codec (demo/tests)
    tta_manifest: str | None = None
    understanding_manifest: str | None = None
    text_manifest: str | None = None
    sft_manifest: str | None = None  # conversations (data/conversation.py): the whole SFT set of a run
    dpo_manifest: str | None = None  # preference pairs (data/conversation.py): stage=dpo
    synthesize: bool = False  # write the demo data set first (make demo)
    synthetic_samples_per_task: int = 40
    shar: SharLoaderConfig | None = None  # Lhotse Shar sources + loader keys (conf/data/shar.yaml); replaces the
    # manifests
    cfg_dropout: float = 0.05
    seq_len: int = 4096  # longest sample (positions); longer ones are skipped and listed (Shar: data.shar.seq_len)
    seed: int = 0
    # held-out data for train.val_every_n_steps (training/validation.py): Shar sources ({name, shar_dir, weight},
    # read with data.shar's loader keys), or manifests in the formats of the training ones; not both
    val_sources: list[SourceSpec] | None = None
    val_tta_manifest: str | None = None
    val_understanding_manifest: str | None = None
    val_text_manifest: str | None = None


@dataclass(kw_only=True)
class RunConfig:
    model: UALMConfig
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    dpo: DPOConfig | None = None  # stage=dpo only
    eval: EvalConfig = field(default_factory=EvalConfig)  # train.eval_every_n_steps (training/eval_config.py)
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # optional W&B next to TensorBoard (loggers.py)
    output_dir: str = "outputs/ualm"

    def validate(self, world_size: int | None = None) -> "RunConfig":
        self.model.validate(world_size)
        self.optim.validate()
        t, p = self.train, self.model.parallel
        if t.stage not in STAGES:
            raise ConfigError(f"train.stage={t.stage!r}: choose one of {STAGES}")
        for key in ("max_steps", "global_batch_size", "micro_batch_size", "log_every_n_steps",
                    "checkpoint_every_n_steps", "keep_last_checkpoints", "max_consecutive_nonfinite"):
            if getattr(t, key) < 1:
                raise ConfigError(f"train.{key}={getattr(t, key)} must be at least 1")
        if self.optim.warmup_steps >= t.max_steps > 1:
            log.warning("optim.warmup_steps=%d >= train.max_steps=%d: the learning rate never reaches optim.lr "
                        "(stage=pretrain warms up for 2000 steps; a short run sets optim.warmup_steps too)",
                        self.optim.warmup_steps, t.max_steps)
        for key in ("hang_timeout_s", "startup_timeout_s", "save_timeout_s"):
            if getattr(t, key) < 0:
                raise ConfigError(f"train.{key}={getattr(t, key)} must be >= 0 (train.hang_timeout_s=0: no watchdog)")
        if t.stop_at_step is not None and t.stop_at_step < 1:
            raise ConfigError(f"train.stop_at_step={t.stop_at_step} must be at least 1 (or null)")
        for key in ("seq_len", "synthetic_samples_per_task"):
            if getattr(self.data, key) < 1:
                raise ConfigError(f"data.{key}={getattr(self.data, key)} must be at least 1")
        if t.global_batch_size % t.micro_batch_size:
            raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not a multiple of "
                              f"train.micro_batch_size={t.micro_batch_size}")
        if p.context_parallel_size > 1:  # megatron's load-balanced causal split: 2 x CP chunks per sequence
            shar_seq = self.data.shar.seq_len if self.data.shar is not None else None
            for key, seq in (("data.seq_len", self.data.seq_len), ("data.shar.seq_len", shar_seq)):
                if seq is not None and seq % (2 * p.context_parallel_size):
                    raise ConfigError(f"{key}={seq} must be divisible by 2 x model.parallel.context_parallel_size = "
                                      f"{2 * p.context_parallel_size}")
        if world_size is not None:
            dp = p.data_parallel_size(world_size)
            if t.global_batch_size % (t.micro_batch_size * dp):
                raise ConfigError(f"train.global_batch_size={t.global_batch_size} must be divisible by "
                                  f"micro_batch_size x data-parallel size = {t.micro_batch_size} x {dp}")
        self._validate_interleaving(world_size)
        if not 0.0 <= self.data.cfg_dropout < 1.0:
            raise ConfigError(f"data.cfg_dropout={self.data.cfg_dropout} must lie in [0, 1)")
        self._validate_posttraining()
        d = self.data
        if not (d.synthesize or d.shar is not None or d.tta_manifest or d.understanding_manifest or d.text_manifest
                or d.sft_manifest or d.dpo_manifest):
            raise ConfigError("no training data: set data=shar (or data=pretrain_blend) with Shar sources, "
                              "data.tta_manifest / understanding_manifest / text_manifest, or data.synthesize=true")
        if d.shar is not None:
            if d.synthesize or d.tta_manifest or d.understanding_manifest or d.text_manifest or d.sft_manifest \
                    or d.dpo_manifest:
                raise ConfigError("data.shar replaces data.synthesize and the data.*_manifest keys: set only one")
        self._validate_validation()
        self._validate_evaluation()
        return self

    def _validate_interleaving(self, world_size: int | None) -> None:
        """Megatron's interleaved schedule (0.16.1) runs the micro-batches in groups of PP per virtual stage and
        refuses a count that is not a multiple of PP: per optimizer step global_batch_size / (micro_batch_size x
        DP), and train.val_batches per validation. Without the world size (DP unknown) the count per step can
        still be refused when even DP=1 cannot give a multiple."""
        t, p = self.train, self.model.parallel
        pp = p.pipeline_model_parallel_size
        if p.virtual_pipeline_model_parallel_size is None:
            return
        dp = p.data_parallel_size(world_size) if world_size is not None else 1
        per_step = t.global_batch_size // (t.micro_batch_size * dp)
        if (per_step if world_size is not None else t.global_batch_size // t.micro_batch_size) % pp:
            where = f" x data-parallel size {dp}" if world_size is not None else ""
            raise ConfigError(f"model.parallel.virtual_pipeline_model_parallel_size="
                              f"{p.virtual_pipeline_model_parallel_size} needs the micro-batches of each step, "
                              f"train.global_batch_size={t.global_batch_size} / (train.micro_batch_size="
                              f"{t.micro_batch_size}{where}) = {per_step}, to be a multiple of "
                              f"pipeline_model_parallel_size={pp} (megatron's interleaved schedule)")
        if t.val_every_n_steps is not None and t.val_batches % pp:
            raise ConfigError(f"train.val_batches={t.val_batches} must be a multiple of model.parallel."
                              f"pipeline_model_parallel_size={pp} with virtual_pipeline_model_parallel_size set "
                              "(megatron's interleaved schedule runs micro-batches in groups of PP)")

    def _validate_evaluation(self) -> None:
        every, p = self.train.eval_every_n_steps, self.model.parallel
        self.eval.validate(every)
        if not every:
            return
        # evaluation decodes with the training model itself (inference/megatron_backend.py): a layout that
        # backend cannot drive is refused here rather than at the first evaluation
        layout = [(p.pipeline_model_parallel_size > 1, f"pipeline_model_parallel_size="
                   f"{p.pipeline_model_parallel_size} (the decoding loop needs every step's logits on one stage)"),
                  (p.virtual_pipeline_model_parallel_size is not None, "virtual_pipeline_model_parallel_size set"),
                  (p.context_parallel_size > 1, f"context_parallel_size={p.context_parallel_size}"),
                  (p.sequence_parallel, "sequence_parallel=true"),
                  (p.transformer_impl != "local", f"transformer_impl={p.transformer_impl!r} (decoding uses the "
                                                  "local spec's explicit padding mask)")]
        refused = [why for bad, why in layout if bad]
        if refused:
            raise ConfigError(f"train.eval_every_n_steps={every} generates with the training model, which needs "
                              f"PP1 / no CP / no SP / the local spec (any TP); this run has model.parallel."
                              f"{refused[0]}: set train.eval_every_n_steps=0 and evaluate the saved checkpoints "
                              "offline (examples/evaluate.py loads any layout at PP1)")

    def _validate_validation(self) -> None:
        t, d = self.train, self.data
        if t.val_every_n_steps is not None and t.val_every_n_steps < 1:
            raise ConfigError(f"train.val_every_n_steps={t.val_every_n_steps} must be at least 1 (or null: never)")
        if t.val_batches < 1:
            raise ConfigError(f"train.val_batches={t.val_batches} must be at least 1")
        manifests = [key for key in VAL_MANIFEST_KEYS if getattr(d, key)]
        if d.val_sources is not None and manifests:
            raise ConfigError(f"data.val_sources and data.{manifests[0]} are two held-out sets: set only one")
        if d.val_sources is not None:
            try:
                SharLoaderConfig(sources=d.val_sources)  # the loader's rules: some sources, unique names
            except ValueError as err:
                raise ConfigError(str(err).replace("data.shar.sources", "data.val_sources")) from err
        if t.val_every_n_steps is None:
            return
        if d.val_sources is None and not manifests:
            raise ConfigError(f"train.val_every_n_steps={t.val_every_n_steps} needs held-out data: set "
                              "data.val_sources (Shar) or data.val_tta_manifest / val_understanding_manifest / "
                              "val_text_manifest")
        if t.stage == "dpo":
            raise ConfigError("train.val_every_n_steps scores the LM loss, not preference pairs: unset it for "
                              "train.stage=dpo")


    def _validate_posttraining(self) -> None:
        d, stage = self.data, self.train.stage
        pretraining = (d.tta_manifest, d.understanding_manifest, d.text_manifest)
        if d.sft_manifest and (any(pretraining) or d.synthesize or d.dpo_manifest):
            raise ConfigError("data.sft_manifest is the whole SFT set of a run: write TTA / understanding / text "
                              "records as conversations too (data/conversation.py), or blend Shar sources")
        if stage in ("sft", "dpo") and not self.train.init_from:
            raise ConfigError(f"train.stage={stage} starts from a trained model: set train.init_from (a pre-training "
                              "or SFT checkpoint folder)")
        if stage == "sft" and not d.sft_manifest and d.shar is None:
            raise ConfigError("train.stage=sft needs conversations: set data.sft_manifest (or data=shar with "
                              "conversation sources)")
        if stage == "dpo":
            if self.dpo is None:
                raise ConfigError("train.stage=dpo needs the dpo section (stage=dpo in conf/ sets it)")
            if not d.dpo_manifest and d.shar is None:
                raise ConfigError("train.stage=dpo needs preference pairs: set data.dpo_manifest")
            if d.shar is not None and self.dpo.reference == "offline":
                raise ConfigError("dpo.reference=offline reads a sidecar scored for data.dpo_manifest: with data.shar "
                                  "set dpo.reference=online (a frozen copy of dpo.reference_checkpoint), or train "
                                  "from data.dpo_manifest")
            if any(pretraining) or d.synthesize:
                raise ConfigError("train.stage=dpo trains on preference pairs only: unset data.*_manifest "
                                  "(other than dpo_manifest) and data.synthesize")
            self.dpo.validate(self.model.vocab.num_codebooks)
        else:
            if d.dpo_manifest:
                raise ConfigError(f"data.dpo_manifest is read by train.stage=dpo, not {stage!r}")
            if self.dpo is not None:
                raise ConfigError(f"the dpo section is read by train.stage=dpo, not {stage!r}")


RECORDED_SECTIONS = ("data", "train", "optim")  # model.* is recorded whole as ualm_config


def recorded_run_config(run: RunConfig) -> dict[str, Any]:
    """The run's sections a checkpoint keeps (plain dicts): the HF export's model card shows where it came from."""
    return {key: asdict(getattr(run, key)) for key in RECORDED_SECTIONS}


def check_data_paths(run: RunConfig, to_host: Callable[[str], str] = str) -> None:
    """The run's data exists, each said with its key: the manifests, and every Shar source's shards/ folder with a
    task that fits the stage. ``to_host`` maps a path as the job sees it to this machine (the launcher passes its
    container mounts; training, the identity). Every problem is listed in one ConfigErrors."""
    problems = Problems()
    keys = VAL_MANIFEST_KEYS if run.data.synthesize else (
        "tta_manifest", "understanding_manifest", "text_manifest", "sft_manifest", "dpo_manifest", *VAL_MANIFEST_KEYS)
    for key in keys:
        value = getattr(run.data, key)
        if value and not Path(to_host(value)).is_file():
            problems.add(f"data.{key}={value!r}: no such file")
    if run.data.shar is not None:
        with problems.check():
            _check_shar_sources(run, to_host)
    if run.data.val_sources:
        with problems.check():
            _source_tasks(run.data.val_sources, "data.val_sources", False, "validation", to_host)
    if run.train.eval_every_n_steps:
        with problems.check():
            run.eval.check_paths(to_host)
    problems.raise_all()


# (config key, what it is) of every input folder besides the data (check_data_paths) that must exist
INPUT_FOLDERS = (("data.tokenizer", "tokenizer folder"), ("data.codec_path", "X-Codec folder"),
                 ("model.audio_in.encoder_path", "audio encoder folder"), ("train.init_from", "initial weights folder"),
                 ("dpo.reference_checkpoint", "reference checkpoint folder"))
# folders that hold a model's files: an empty one fails only once the model is built
_FILLED = ("data.tokenizer", "model.audio_in.encoder_path", "train.init_from", "dpo.reference_checkpoint")


def check_input_folders(run: RunConfig, to_host: Callable[[str], str] = str, where: str = "") -> None:
    """Each folder of ``INPUT_FOLDERS`` the run names exists (and is not empty where a model's files must be),
    said with its key; ``where`` ends each message (the launcher: its container mounts). The launcher and the
    commands that train or score (check_local_paths) run the same check. Every problem in one ConfigErrors."""
    problems = Problems()
    for key, what in INPUT_FOLDERS:
        value: Any = run
        for part in key.split("."):
            value = getattr(value, part, None)
        if not value or (key == "data.tokenizer" and value == "byte"):
            continue
        host = Path(to_host(str(value)))
        if not host.exists():
            problems.add(f"{key}={value!r}: no such {what} on this host{where}")
        elif key in _FILLED and host.is_dir() and next(host.iterdir(), None) is None:
            problems.add(f"{key}={value!r}: the {what} is empty{where} (a copy or download that did not finish?)")
    problems.raise_all()


def check_local_paths(run: RunConfig) -> None:
    """On the machine that trains (or scores): the input folders (check_input_folders), the data
    (check_data_paths), and output_dir can be created and written; all problems at once."""
    problems = Problems()
    with problems.check():
        check_input_folders(run)
    with problems.check():
        check_data_paths(run)
    with problems.check():
        check_output_dir(run.output_dir)
    problems.raise_all()


def check_output_dir(output_dir: str) -> None:
    """ConfigError unless ``output_dir`` exists as a folder or can be created, and can be written. The nearest
    existing folder gets a real probe (a temporary folder made and removed): root passes ``os.access`` anywhere,
    also in /proc, where nothing can be created."""
    path = Path(output_dir).absolute()
    try:
        existing = next(p for p in (path, *path.parents) if p.exists())
    except PermissionError as e:  # a folder on the way may not be looked inside (stat: EACCES)
        hidden = Path(e.filename).parent if e.filename else path.parent
        raise ConfigError(f"output_dir={output_dir!r} cannot be created: no permission to look inside "
                          f"{hidden}") from None
    if not existing.is_dir():
        raise ConfigError(f"output_dir={output_dir!r} cannot be created: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir={output_dir!r} cannot be written: no write permission on {existing}")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".ualm-probe-", dir=existing))
    except OSError as e:
        raise ConfigError(f"output_dir={output_dir!r} cannot be created: {existing} accepts no new folder "
                          f"({e.strerror})") from None


def _check_shar_sources(run: RunConfig, to_host: Callable[[str], str]) -> None:
    """Each source has shards; stage=dpo loads preference sources only, every other stage none: said per source
    before a model is built (or a job submitted)."""
    from ualm_nemo.data.shar_dataset import check_pair_sources

    dpo = run.train.stage == "dpo"
    tasks = _source_tasks(run.data.shar.sources, "data.shar.sources", dpo, f"train.stage={run.train.stage}", to_host)
    try:  # the loader's own rules for pair batches (never packed, room for two rows)
        check_pair_sources(run.data.shar, tasks)
    except ValueError as err:
        raise ConfigError(str(err)) from err  # the message names data.shar.<key>


def _source_tasks(sources: list[SourceSpec], key: str, pairs: bool, reader: str, to_host: Callable[[str], str]
                  ) -> dict[str, str | None]:
    """{name: task} of Shar sources, each checked to have shards and to hold preference pairs iff ``pairs``;
    every bad source listed (ConfigErrors)."""
    from ualm_nemo.data.shar import shards_dir, source_task

    tasks, problems = {}, Problems()
    for i, source in enumerate(sources):
        name, shar_dir = source.name, source.shar_dir
        host_dir = to_host(str(shar_dir)) if shar_dir else None
        if not host_dir or not shards_dir(host_dir).is_dir():
            shown = f" (on this host: {host_dir})" if host_dir and host_dir != shar_dir else ""
            problems.add(f"{key}[{i}] ({name}): shar_dir={shar_dir!r}{shown} has no shards/ folder "
                         "(run examples/prepare_data.py, then examples/tokenize_audio.py)")
            continue
        task = source_task(host_dir)  # one cuts file per source (not per shard)
        if pairs != (task == "preference"):
            wanted = "preference pairs" if pairs else "no preference pairs (those are for train.stage=dpo)"
            held = f"{task!r} cuts" if task else "no cuts"
            problems.add(f"{key}[{i}] ({name}) holds {held}: {reader} loads {wanted}")
        tasks[name] = task
    problems.raise_all()
    return tasks


def _build(cls, values: Mapping[str, Any] | None, where: str):
    values = dict(values or {})
    if "betas" in values:
        values["betas"] = tuple(values["betas"])
    return build_section(cls, values, where)


def _data_config(values: Mapping[str, Any] | None) -> DataConfig:
    """The data section; ``shar`` and ``val_sources`` become typed here, their keys named like every other."""
    values = dict(values or {})
    if values.get("shar") is not None:
        if not isinstance(values["shar"], Mapping):
            raise ConfigError(f"data.shar must be a section of loader keys and sources, got {values['shar']!r}")
        values["shar"] = SharLoaderConfig.from_dict(values["shar"])
    if values.get("val_sources") is not None:
        values["val_sources"] = source_specs(values["val_sources"], "data.val_sources")
    return _build(DataConfig, values, "data")


def run_config_from_dict(cfg: Mapping[str, Any]) -> RunConfig:
    cfg = dict(cfg)
    unknown = sorted(set(cfg) - {"model", "optim", "train", "data", "dpo", "eval", "logger", "output_dir", "stage",
                                     "name"})
    if unknown:
        raise ConfigError(f"unknown top-level key(s): {', '.join(unknown)}")
    return RunConfig(model=UALMConfig.from_dict(cfg.get("model") or {}),
                     optim=_build(OptimConfig, cfg.get("optim"), "optim"),
                     train=_build(TrainConfig, cfg.get("train"), "train"),
                     data=_data_config(cfg.get("data")),
                     dpo=_build(DPOConfig, cfg["dpo"], "dpo") if cfg.get("dpo") is not None else None,
                     eval=_build(EvalConfig, cfg.get("eval"), "eval"),
                     logger=logger_config(cfg.get("logger")),
                     output_dir=cfg.get("output_dir", "outputs/ualm"))
