"""Hang detection: a rank that makes no progress for too long ends its own process, so Slurm stops every rank.

When one rank hangs (a GPU that stops answering, a process stopped by SIGSTOP, a deadlock), the other ranks wait
inside a collective until the process group's timeout (30 min by default, often set far higher for saves). A daemon
thread in every rank watches a deadline that training moves forward: the end of each optimizer step gives
``train.hang_timeout_s`` more, a section (start-up until the first step, a checkpoint save) gives its own budget.
Past the deadline the thread prints every thread's stack (where it was stuck) and calls ``os._exit``: the healthy
ranks detect the hung one through the collective it never joins, and ``srun --kill-on-bad-exit`` then kills every
task of the step, the hung one included (SIGKILL ends a stopped process). The batch script restarts the step from
the latest checkpoint (launcher.sbatch). Collective calls release the GIL, so the thread runs while the main thread
waits in one.

This is the smallest equivalent of nvidia-resiliency-ext's rank heartbeat and section timeouts. That package
(0.4.1) was tried here and works on CPU, but its ``ft_launcher`` restarts ranks per node outside srun: after a
failure on one of several nodes the nodes' restart counts disagree and a node can wait out the rejoin timeout,
Slurm's requeue of a lost node and the batch script's run state are bypassed, and it adds NVML packages to the
install. One thread here plus the batch script's srun restart loop gives the same detection (launcher/README.md,
"Faults").
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import sys
import threading
import time
from typing import Iterator

from lightning.pytorch import Callback, LightningModule, Trainer

log = logging.getLogger(__name__)

HANG_EXIT_CODE = 75  # what a rank ended by the watchdog exits with (EX_TEMPFAIL: try again)
_active: "HangWatchdog | None" = None


class HangWatchdog(Callback):
    """Ends the process when no optimizer step finishes within ``step_timeout_s`` (sections have their own)."""

    def __init__(self, step_timeout_s: float, startup_timeout_s: float, save_timeout_s: float,
                 poll_s: float | None = None) -> None:
        self.step_timeout_s, self.startup_timeout_s, self.save_timeout_s = (step_timeout_s, startup_timeout_s,
                                                                            save_timeout_s)
        self.poll_s = poll_s if poll_s is not None else max(0.05, min(1.0, step_timeout_s / 20))
        self._lock = threading.Lock()
        self._deadline = float("inf")
        self._what = "not started"
        self._since = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- the deadline ---------------------------------------------------------------------------------------
    def expect(self, seconds: float, what: str) -> None:
        """The next progress must come within ``seconds``; ``what`` names the section in the report."""
        with self._lock:
            self._since = time.monotonic()
            self._deadline, self._what = self._since + seconds, what

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            with self._lock:
                late = time.monotonic() - self._deadline
                what, waited = self._what, time.monotonic() - self._since
            if late > 0:
                self._fire(what, waited)

    def _fire(self, what: str, waited: float) -> None:
        rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
        msg = (f"rank {rank}: no progress for {waited:.1f} s during {what} (the hang timeouts are "
               f"train.hang_timeout_s / startup_timeout_s / save_timeout_s): another rank is probably hung or dead; "
               f"ending this process (exit {HANG_EXIT_CODE}) so every rank stops and the job restarts from the "
               "latest checkpoint. Stacks of this rank:")
        log.error(msg)
        print(f"[watchdog] {msg}", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(HANG_EXIT_CODE)

    # --- Lightning hooks ------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        global _active
        self.expect(self.startup_timeout_s, "start-up (model build, checkpoint load, first step)")
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="ualm-hang-watchdog", daemon=True)
        self._thread.start()
        _active = self

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        self.expect(self.step_timeout_s, f"the training step after step {trainer.global_step}")

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        global _active
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if _active is self:
            _active = None


@contextlib.contextmanager
def section(what: str, kind: str = "save") -> Iterator[None]:
    """A stretch with its own budget (``kind="save"``: train.save_timeout_s); afterwards the step budget again."""
    watchdog = _active
    if watchdog is None:
        yield
        return
    watchdog.expect(watchdog.save_timeout_s if kind == "save" else watchdog.startup_timeout_s, what)
    try:
        yield
    finally:
        watchdog.expect(watchdog.step_timeout_s, f"the training step after {what}")
