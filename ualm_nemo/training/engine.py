"""MegatronEngine: model chunks + Megatron DDP + optimizer + schedule, and one training step.

The engine is the single place where a batch meets the pipeline schedule. The NeMo model class and the CPU
test harness both drive it, so the same code path is tested on CPU (gloo) and run on GPUs (NCCL).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from ualm_nemo.data.microbatch import MicroBatch
from ualm_nemo.distributed import checkpoint
from ualm_nemo.distributed.async_save import AsyncSaver
from ualm_nemo.distributed.optim import OptimConfig, build_optimizer, build_scheduler, wrap_ddp
from ualm_nemo.distributed.parallel import comm_device
from ualm_nemo.model.builder import build_model_chunks
from ualm_nemo.model.config import UALMConfig, check_same_model
from ualm_nemo.training.objectives import REPORT, LMObjective, RowLogProbs
from ualm_nemo.training.stages import apply_stage

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    loss: float  # the objective's loss per normaliser (stream-0 target, or pair), over micro-batches and DP
    num_tokens: int
    grad_norm: float | None
    lr: float
    skipped: bool
    metrics: Any = None  # the objective's own figures (DPOMetrics for DPO), None for the LM loss


def _forward_step(objective, data_iterator, model):
    batch: MicroBatch = next(data_iterator)
    output = model(**batch.model_inputs(), per_stream=objective.per_stream)
    return output, partial(objective.loss, batch)


def run_schedule(modules: list[torch.nn.Module], objective, microbatches: list[MicroBatch], forward_only: bool):
    """One pass of Megatron's (pipeline) schedule over ``microbatches`` -> the last stage's loss reports.

    Several ``modules`` are the virtual stages of this rank (VPP): the interleaved schedule runs every
    micro-batch through each of them and reads one data iterator per chunk."""
    first = microbatches[0].tokens
    data = iter(microbatches) if len(modules) == 1 else [iter(microbatches) for _ in modules]
    return get_forward_backward_func()(
        forward_step_func=partial(_forward_step, objective), data_iterator=data, model=modules,
        num_microbatches=len(microbatches), seq_length=first.shape[1], micro_batch_size=first.shape[0],
        forward_only=forward_only)


@torch.no_grad()
def row_log_probs(modules: list[torch.nn.Module], vocab, microbatches: list[MicroBatch]
                  ) -> list[dict[str, torch.Tensor]]:
    """Per-stream sequence log-probs of every row (``objectives.RowLogProbs``) on the last pipeline stage (an
    empty list elsewhere): one {"row_logps" [b, N] float64, "row_counts" [b, N]} per micro-batch."""
    for module in modules:
        module.eval()
    return run_schedule(modules, RowLogProbs(vocab), microbatches, forward_only=True)


class MegatronEngine:
    def __init__(self, model_cfg: UALMConfig, optim_cfg: OptimConfig | None, max_steps: int, stage: str = "pretrain",
                 train: bool = True, initialize: bool = True, objective=None) -> None:
        """``objective``: what a step optimises (training/objectives.py; default the LM loss).
        ``initialize=False``: skip Megatron's random initialisation (~1 min of CPU per rank for the 7B at every
        job start) because a checkpoint load will overwrite every weight (a resume, or ``train.init_from``);
        training refuses to step until one has (``weights_pending``)."""
        self.cfg = model_cfg
        self.objective = objective or LMObjective()
        self.reference: list[torch.nn.Module] | None = None  # a frozen reference model (online DPO)
        self.chunks = build_model_chunks(model_cfg, initialize=initialize)  # one per virtual stage under VPP
        self.weights_pending = not initialize
        for chunk in self.chunks:
            apply_stage(chunk, stage)
        self.optimizer = self.scheduler = None
        self.ddp = None
        if train:
            self.ddp = wrap_ddp(self.chunks, model_cfg)
            self.optimizer = build_optimizer(self.ddp, optim_cfg.validate(), model_cfg)
            self.scheduler = build_scheduler(self.optimizer, optim_cfg, max_steps)
        self.step = 0
        self.saver = AsyncSaver()

    @property
    def modules(self) -> list[torch.nn.Module]:
        return self.ddp if self.ddp is not None else self.chunks

    def _run_schedule(self, microbatches: list[MicroBatch], forward_only: bool):
        return run_schedule(self.modules, self.objective, microbatches, forward_only)

    def _gather_params(self) -> None:
        """With model.parallel.overlap_param_gather the optimizer step leaves other ranks' shards of the weights
        stale until the next training forward gathers them: gather now, before an eval forward or a save reads
        them (what Megatron-LM's disable_forward_pre_hook does). A no-op without the overlap."""
        if self.ddp is not None and self.cfg.parallel.overlap_param_gather:
            for module in self.ddp:
                module.start_param_sync(force_sync=True)

    def _reduce(self, reports: list[dict]) -> torch.Tensor:
        """Sum the report vectors over micro-batches and DP on the last stage, then share them with every rank."""
        size = torch.tensor([len(reports[0][REPORT]) if reports else 0], device=comm_device())
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            last = parallel_state.get_pipeline_model_parallel_last_rank()
            dist.broadcast(size, src=last, group=parallel_state.get_pipeline_model_parallel_group())
        total = torch.zeros(int(size), dtype=torch.float64, device=comm_device())
        if parallel_state.is_pipeline_last_stage():
            for report in reports:
                total += report[REPORT].double().to(total.device)
            dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(total, src=last, group=parallel_state.get_pipeline_model_parallel_group())
        return total

    def _reduce_loss(self, reports: list[dict]) -> tuple[float, int, Any]:
        total = self._reduce(reports)
        return total[0].item() / max(total[1].item(), 1.0), int(total[1].item()), self.objective.summarise(total)

    def set_reference(self, modules: list[torch.nn.Module]) -> None:
        """A frozen copy of the model (same layout) whose log-probs each DPO step reads (online reference)."""
        for module in modules:
            module.eval()
            module.requires_grad_(False)
        self.reference = modules

    def row_log_probs(self, microbatches: list[MicroBatch], modules=None) -> list[dict[str, torch.Tensor]]:
        if modules is None:
            self._gather_params()
        return row_log_probs(modules or self.chunks, self.cfg.vocab, microbatches)

    def train_step(self, microbatches: list[MicroBatch]) -> StepResult:
        if self.weights_pending:
            raise RuntimeError("the model was built without initialisation for a checkpoint load that has not "
                               "happened (resume or train.init_from): refusing to train on uninitialised memory")
        if self.reference is not None:  # online reference: its log-probs for this step's rows, before the update
            device = next(self.chunks[0].parameters()).device
            for module in self.reference:  # built on CPU; Lightning moved the policy only (no-op once moved)
                module.to(device)
            for mb, ref in zip(microbatches, self.row_log_probs(microbatches, self.reference)):
                mb.ref_logps = ref["row_logps"]
        for module in self.ddp:
            module.train()
            module.zero_grad_buffer()
        self.optimizer.zero_grad()
        reports = self._run_schedule(microbatches, forward_only=False)
        loss, num, metrics = self._reduce_loss(reports)
        self.step += 1  # iterations count skipped updates too (as Megatron-LM's), so step == trainer.global_step
        if not math.isfinite(loss):  # every rank sees the same reduced loss: all skip together
            return StepResult(loss, num, None, self.optimizer.param_groups[0]["lr"], skipped=True, metrics=metrics)
        updated, grad_norm, _ = self.optimizer.step()
        if updated:
            self.scheduler.step(increment=1)
        return StepResult(loss, num, grad_norm, self.optimizer.param_groups[0]["lr"], skipped=not updated,
                          metrics=metrics)

    @torch.no_grad()
    def eval_loss(self, microbatches: list[MicroBatch]) -> float:
        self._gather_params()
        for module in self.modules:
            module.eval()
        return self._reduce_loss(self._run_schedule(microbatches, forward_only=True))[0]

    @torch.no_grad()
    def evaluate(self, microbatches: list[MicroBatch], objective) -> torch.Tensor:
        """Forward only under another ``objective`` (validation): its report summed over micro-batches and DP,
        on every rank (all ranks call it together)."""
        self._gather_params()
        for module in self.modules:
            module.eval()
        return self._reduce(run_schedule(self.modules, objective, microbatches, forward_only=True))

    def decoding_model(self) -> torch.nn.Module:
        """The training model itself for decoding (PP1: one chunk), its weights gathered first; the raw chunk,
        not the DDP wrapper (no gradient hooks run under no_grad)."""
        if len(self.chunks) != 1 or not (self.chunks[0].pre_process and self.chunks[0].post_process):
            raise RuntimeError("decoding with the training model needs the whole model in one chunk (PP1, no "
                               "virtual pipeline stages): evaluate the saved checkpoint at PP1 instead")
        self._gather_params()
        return self.chunks[0]

    # --- checkpoints ----------------------------------------------------------------------------
    def save(self, root: str, extra: dict[str, Any] | None = None, per_rank: dict[str, Any] | None = None,
             keep_last: int | None = None, async_save: bool = False):
        """``async_save``: return once a snapshot is taken; the files are written in the background and
        ``latest`` moves when every rank is done (``poll_save`` / ``finish_save``; distributed/async_save.py)."""
        self._gather_params()
        common = {"scheduler": self.scheduler.state_dict() if self.scheduler else None,
                  "ualm_config": dataclasses.asdict(self.cfg), **(extra or {})}
        if async_save:
            return self.saver.start(root, self.step, self.chunks, self.optimizer, common, per_rank, keep_last)
        self.finish_save()  # a synchronous save never overtakes an asynchronous one
        return checkpoint.save_checkpoint(root, self.step, self.chunks, self.optimizer, common, per_rank, keep_last)

    def save_weights(self, root: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """The model weights alone (no optimizer, no scheduler) as ``root/iter_N`` (collective): what a
        ``.nemo`` archive holds (training/nemo_archive.py); loads at any layout like every checkpoint."""
        self.finish_save()  # never overtake an asynchronous save in flight
        self._gather_params()
        common = {"ualm_config": dataclasses.asdict(self.cfg), **(extra or {})}
        return checkpoint.save_checkpoint(root, self.step, self.chunks, None, common)

    def poll_save(self):
        """Publish a finished asynchronous save (collective: one all_reduce while one is pending)."""
        return self.saver.poll()

    def finish_save(self):
        """Wait for the asynchronous save in flight and publish it (collective); None when there is none."""
        return self.saver.wait()

    def load(self, path: str, load_optimizer: bool = True) -> dict[str, Any]:
        state = checkpoint.load_checkpoint(path, self.chunks, self.optimizer if load_optimizer else None)
        if load_optimizer and self.scheduler is not None and state.get("scheduler"):
            self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.weights_pending = False
        return state

    def load_initial_weights(self, path: str) -> dict[str, Any]:
        """Model weights only (any saved layout -> this engine's), to start a run from, e.g. an HF import.

        The step stays 0 and the optimizer / scheduler stay fresh; the optimizer's fp32 main copies (bf16
        training) are refreshed from the loaded weights, or its first step would revert to the random init. A
        checkpoint of another model (its recorded config's shapes) is refused, naming the keys."""
        iteration = checkpoint.resolve_checkpoint(path)
        stored = checkpoint.stored_model_config(iteration)
        if stored is not None:
            check_same_model(stored, self.cfg)
        state = checkpoint.load_checkpoint(iteration, self.chunks, None, restore_rng=False)
        if self.optimizer is not None:
            self.optimizer.reload_model_params()
        self.weights_pending = False
        if not dist.is_initialized() or dist.get_rank() == 0:
            log.info("train.init_from: loaded the model weights of %s (step %s of that run); optimizer, scheduler "
                     "and step start fresh", iteration, state.get("step", "?"))
        return state

