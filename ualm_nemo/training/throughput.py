"""perf/* figures every ``log_every_n_steps``: is the run fast, is it using its GPUs, is one rank holding it back.

Per window of steps (since the last log step), each rank measures its own seconds in the training step, its
seconds waiting for the data loader (the gap between one step's end and the next one's start, less any checkpoint
save in that gap), the positions and samples it trained on and their model FLOPs (ualm_nemo.model.flops: the
formula launcher.plan sizes runs with, so plan and run compare directly), and its peak memory. One all_gather of
those few floats per log step (the run's process group: gloo on CPU, NCCL on GPU) gives rank 0 the totals and
each rank's step time: a rank far above the median is named in a warning.

Ranks of one model replica (TP x PP x CP) train on the same data, so totals count each replica once:
sum over ranks / (world / DP). Step time is wall time per step over the window, data wait and saves included,
so tokens/s = tokens per step / step time is what the run really achieves.

A limit of the straggler note: a rank that is slow *inside* the step's collectives (a slow GPU before the
gradient all-reduce) makes the others wait there, so every rank's step time grows alike; the note catches a rank
whose own work outside the collectives is slow. Per-kernel GPU timing (nvidia-resiliency-ext's straggler
detection) would catch the first kind too, at a cost per step.
"""

from __future__ import annotations

import logging
import resource
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer

from ualm_nemo.model.flops import flops_per_token, peak_flops

log = logging.getLogger(__name__)

# what each rank contributes to the one all_gather per log step, in this order
FIELDS = ("step_s", "busy_s", "wait_s", "positions", "samples", "flops", "peak_bytes")


def peak_memory_bytes(device: torch.device) -> float:
    """The GPU's peak allocated bytes, or on CPU this process's peak resident set (Linux reports KiB)."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def stragglers(step_times: list[float], ratio: float) -> dict[int, float]:
    """{rank: its step time / the median of the other ranks' step times} for each rank above ``ratio``. The
    others' median (not all ranks'): with two ranks the median of both would hide a slow one."""
    out = {}
    for rank, t in enumerate(step_times):
        median = statistics.median(step_times[:rank] + step_times[rank + 1:]) if len(step_times) > 1 else t
        if median > 0 and t > ratio * median:
            out[rank] = t / median
    return out


class ThroughputMonitor(Callback):
    """Measures every step on every rank; at log steps gathers, logs perf/* (rank 0) and warns of stragglers.

    Put it first among the callbacks: its batch-start hook then runs before the others' and its batch-end hook
    before the checkpoint callback's save (whose seconds the strategy reports separately)."""

    def __init__(self, log_every_n_steps: int, straggler_ratio: float = 1.5) -> None:
        self.every, self.ratio = log_every_n_steps, straggler_ratio
        self.peak: float | None = None  # the GPU's peak FLOP/s; None on CPU or an unknown card: no MFU
        self.last: dict[str, float] = {}  # the newest figures (rank 0), for the console line
        self._flops_cache: dict[int, float] = {}  # FLOPs per position by row length
        self.step_start, self.saved_before = 0.0, 0.0
        self.step_end: float | None = None  # the previous step's end: the data wait runs from there
        self._reset()

    def _reset(self) -> None:
        self.window = dict.fromkeys(FIELDS[1:6], 0.0)
        self.steps, self.window_start = 0, time.perf_counter()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        device = pl_module.device
        self.peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
        self._reset()
        self.step_end, self.saved_before = None, _save_seconds(trainer)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        saved = _save_seconds(trainer)
        if self.step_end is not None:
            self.window["wait_s"] += max(0.0, now - self.step_end - (saved - self.saved_before))
        self.saved_before, self.step_start = saved, now
        positions, flops = self._count(pl_module, batch)
        self.window["positions"] += positions
        self.window["flops"] += flops
        self.window["samples"] += float(getattr(batch, "samples", 0))

    def _count(self, pl_module: LightningModule, batch: Any) -> tuple[float, float]:
        """Positions (rows x length, padding included: what the matmuls run over) and their model FLOPs."""
        positions = flops = 0.0
        for mb in getattr(batch, "microbatches", ()):
            rows, length = mb.tokens.shape[:2]
            if length not in self._flops_cache:
                self._flops_cache[length] = flops_per_token(pl_module.run.model, length)["total"]
            positions += rows * length
            flops += rows * length * self._flops_cache[length]
        return positions, flops

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        self.step_end = time.perf_counter()
        self.window["busy_s"] += self.step_end - self.step_start
        self.steps += 1
        step = trainer.global_step
        if step % self.every and step != trainer.max_steps:
            return
        mine = [(self.step_end - self.window_start) / self.steps, self.window["busy_s"] / self.steps,
                self.window["wait_s"] / self.steps, self.window["positions"] / self.steps,
                self.window["samples"] / self.steps, self.window["flops"] / self.steps,
                peak_memory_bytes(pl_module.device)]
        ranks = _gather(torch.tensor(mine, dtype=torch.float64, device=pl_module.device))
        self._reset()
        self.window_start = self.step_end  # the log step's own gather counts in the next window
        if trainer.is_global_zero:
            for rank, times in stragglers([r[1] for r in ranks], self.ratio).items():
                log.warning("straggler at step %d: rank %d took %.3f s per step, %.1fx the other ranks' median",
                            step, rank, ranks[rank][1], times)
            self.last = self.figures(ranks, _save_seconds_last(trainer))
            for logger in trainer.loggers:
                logger.log_metrics({f"perf/{k}": v for k, v in self.last.items()}, step=step)

    def figures(self, ranks: list[list[float]], save_s: float | None) -> dict[str, float]:
        """perf/* from every rank's row (FIELDS): totals count each model replica once (module docstring)."""
        world = len(ranks)
        replicas = world // _data_parallel_size(world)  # ranks that share one batch (TP x PP x CP)
        col = {name: [r[i] for r in ranks] for i, name in enumerate(FIELDS)}
        step_s = max(col["step_s"])  # the window's wall time: the same on every rank up to the gather
        tokens, samples, flops = (sum(col[k]) / replicas for k in ("positions", "samples", "flops"))
        out = {"step_time_s": step_s, "data_wait_s": max(col["wait_s"]),
               "tokens_per_s": tokens / step_s, "tokens_per_s_per_gpu": tokens / step_s / world,
               "samples_per_s": samples / step_s, "samples_per_s_per_gpu": samples / step_s / world,
               "tflops_per_gpu": flops / step_s / world / 1e12,
               "peak_memory_gib": max(col["peak_bytes"]) / 2**30}
        if self.peak is not None:
            out["mfu"] = flops / step_s / world / self.peak
        if save_s is not None:
            out["checkpoint_save_s"] = save_s
        return out


def _gather(row: torch.Tensor) -> list[list[float]]:
    """Every rank's row (one all_gather); just this one without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [row.tolist()]
    rows = [torch.empty_like(row) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, row)
    return [r.tolist() for r in rows]


def _data_parallel_size(world: int) -> int:
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_world_size() if parallel_state.model_parallel_is_initialized() else world


def _save_seconds(trainer: Trainer) -> float:
    """All checkpoint-save seconds so far (MegatronStrategy.save_seconds; 0 for another strategy)."""
    return float(getattr(trainer.strategy, "save_seconds", 0.0))


def _save_seconds_last(trainer: Trainer) -> float | None:
    return getattr(trainer.strategy, "last_save_seconds", None)
