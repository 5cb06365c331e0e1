"""Signal-triggered checkpoints, and the run-state file a Slurm batch script reads to requeue or stop.

Slurm signals a job before its time limit (``#SBATCH --signal=USR1@120``) and sends SIGTERM on preemption or at
the limit. The handler only sets a flag (a signal may land inside a collective or a save); at the next batch end
every rank joins one all_reduce so all agree on the step, then all save through ``trainer.save_checkpoint`` and
stop. Rank 0 writes ``<output_dir>/run_state``::

    state=preempted      (saved on a signal: the next job resumes from it)
    state=finished       (max_steps reached: stop chaining)
    state=stopped        (train.stop_at_step or another early end: stop chaining)
    step=<global step>
    max_steps=<max steps>

A run that raises (non-finite losses, a crash) writes nothing: the batch script must not requeue a failing run.
Lightning's own SLURM auto-requeue registers its SIGUSR1 handler only when none exists; this callback installs
its handlers in ``setup`` (before Lightning's), so exactly one save-and-requeue path exists.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer

from ualm_nemo import early_signals
from ualm_nemo.training.callbacks import PeriodicCheckpoint, finish_checkpoint
from ualm_nemo.early_signals import SIGNALS, STATE_FILE, read_run_state, write_run_state  # noqa: F401

log = logging.getLogger(__name__)

class PreemptionCheckpoint(Callback):
    """On SIGUSR1/SIGTERM: checkpoint at the next batch end on all ranks, stop, record ``state=preempted``."""

    def __init__(self, output_dir: str | Path, signals: tuple[int, ...] = SIGNALS) -> None:
        self.output_dir = Path(output_dir)
        self.root = self.output_dir / "checkpoints"
        self.signals = signals
        self.received: int | None = None  # the signal number, set by the handler
        self.preempted_at: int | None = None
        self._previous: dict[int, object] = {}

    # --- signal handling ------------------------------------------------------------------------
    def _handler(self, signum, frame) -> None:
        if early_signals.is_armed():  # still starting (model build, checkpoint load): nothing to save, requeue now
            early_signals.requeue_now(signum)
        self.received = signum  # only a flag: the save happens at a batch end, where all ranks can meet
        previous = self._previous.get(signum)
        if callable(previous) and signum != signal.SIGUSR1:
            previous(signum, frame)  # e.g. a SIGTERM handler someone else installed before us

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for signum in self.signals:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handler)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _agreed(self, trainer: Trainer) -> bool:
        """True on every rank when any rank received a signal (one tiny all_reduce per step)."""
        flag = torch.tensor([0 if self.received is None else 1], dtype=torch.int32,
                            device=trainer.strategy.root_device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    # --- hooks ----------------------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        early_signals.disarm()  # from here a signal means: save at the next batch end, then requeue
        log.info("training from step %d to max_steps=%d (run state: %s)", trainer.global_step, trainer.max_steps,
                 self.output_dir / STATE_FILE)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        if self.preempted_at is not None or not self._agreed(trainer):
            return
        step = trainer.global_step
        name = signal.Signals(self.received).name if self.received is not None else "a signal on another rank"
        log.info("%s received: saving a checkpoint at step %d and stopping; the next job resumes from it",
                 name, step)
        periodic = next((cb for cb in trainer.callbacks if isinstance(cb, PeriodicCheckpoint)), None)
        if periodic is not None:
            periodic._save(trainer)  # no second save of a step it already saved
        else:
            trainer.save_checkpoint(self.root)
        finish_checkpoint(trainer)  # complete before the run state says "resume from it"
        self.preempted_at = step
        trainer.should_stop = True
        if trainer.is_global_zero:
            state = "finished" if step >= trainer.max_steps else "preempted"
            write_run_state(self.output_dir, state, step, trainer.max_steps)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        if step >= trainer.max_steps:
            write_run_state(self.output_dir, "finished", step, trainer.max_steps)
        elif self.preempted_at is None:
            write_run_state(self.output_dir, "stopped", step, trainer.max_steps)
        log.info("run state at step %d/%d: %s", step, trainer.max_steps,
                 read_run_state(self.output_dir).get("state"))
