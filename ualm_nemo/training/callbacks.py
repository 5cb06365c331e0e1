"""Lightning callbacks: periodic distributed checkpoints and a progress bar that knows max_steps."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from tqdm.auto import tqdm


class PeriodicCheckpoint(Callback):
    """Save every ``every_n_steps`` optimizer steps and at the end of training (all ranks take part);
    optionally end the job early at ``stop_at_step`` (the schedule still runs to max_steps)."""

    def __init__(self, root: str | Path, every_n_steps: int, stop_at_step: int | None = None) -> None:
        self.root, self.every_n_steps, self.stop_at_step = Path(root), every_n_steps, stop_at_step
        self.last_saved_step = -1

    def _save(self, trainer: Trainer) -> None:
        if trainer.global_step != self.last_saved_step:
            trainer.save_checkpoint(self.root)
            self.last_saved_step = trainer.global_step

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        finish_checkpoint(trainer, wait=False)  # an asynchronous save written meanwhile becomes `latest`
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self._save(trainer)
        if self.stop_at_step is not None and trainer.global_step >= self.stop_at_step:
            self._save(trainer)  # the schedule still targets max_steps: the next job resumes from here
            trainer.should_stop = True

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._save(trainer)
        finish_checkpoint(trainer)  # the run ends only with its last checkpoint complete


def finish_checkpoint(trainer: Trainer, wait: bool = True) -> None:
    """Publish the asynchronous save in flight: ``wait`` for it, or only if it is done on every rank already
    (both collective). Strategies without asynchronous saves have nothing to do."""
    method = getattr(trainer.strategy, "finish_checkpoint" if wait else "poll_checkpoint", None)
    if method is not None:
        method()


class StepProgressBar(Callback):
    """tqdm over optimizer steps (resumed runs start at their step), with loss, lr and the newest perf/* figures
    (training/throughput.py); rank 0 only."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:
            self.bar = tqdm(total=trainer.max_steps, initial=trainer.global_step, desc="train", unit="step",
                            dynamic_ncols=True)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        if self.bar is None:
            return
        result = getattr(pl_module, "last_result", None)
        if result is not None:
            self.bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{result.lr:.2e}", **_perf(trainer), refresh=False)
        self.bar.update(trainer.global_step - self.bar.n)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.bar is not None:
            self.bar.close()


def _perf(trainer: Trainer) -> dict[str, str]:
    """The console's short form of ThroughputMonitor's newest figures (none before its first log step)."""
    from ualm_nemo.training.throughput import ThroughputMonitor

    last = next((c.last for c in trainer.callbacks if isinstance(c, ThroughputMonitor)), {})
    if not last:
        return {}
    out = {"s/step": f"{last['step_time_s']:.3g}", "tok/s": f"{last['tokens_per_s']:.4g}",
           "TFLOP/s/gpu": f"{last['tflops_per_gpu']:.3g}", "mem_GiB": f"{last['peak_memory_gib']:.1f}"}
    if "mfu" in last:
        out["MFU"] = f"{last['mfu']:.1%}"
    return out
