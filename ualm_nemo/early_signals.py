"""Slurm's signals during start-up, before the preemption callback exists: requeue, do not die.

A task receives SIGUSR1 (``--signal=USR1@N``) or SIGTERM (preemption, time limit) whenever Slurm decides,
also while it is still importing torch or loading a checkpoint. Python's default action for both is to
terminate: the task would die with no ``run_state``, which the batch script reads as a failed run, and a
month-long chain of jobs would stop. So the entry script calls :func:`install` on its first lines (this
module imports nothing heavy), which only records a signal; :func:`arm` (once ``output_dir`` is known, before
the model is built) acts on a recorded signal and on any later one until training takes over: nothing was
trained in this job, so there is nothing to save -- each task writes ``state=preempted`` (the step of the latest
checkpoint) and exits 0 at once, and the batch script requeues. The preemption callback
(preemption.py) installs its handlers in ``setup`` but hands signals that come before the first training step
(model build, checkpoint load) to :func:`requeue_now`, and disarms this module when training starts.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
STATE_FILE = "run_state"

_received: list[int] = []
_armed: dict[str, object] = {}


def read_run_state(output_dir: str | Path) -> dict[str, str]:
    """The run-state file as a dict ({} when absent)."""
    path = Path(output_dir) / STATE_FILE
    if not path.exists():
        return {}
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def write_run_state(output_dir: str | Path, state: str, step: int, max_steps: int, reason: str | None = None) -> None:
    path = Path(output_dir) / STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{STATE_FILE}.tmp-{os.getpid()}")
    why = "" if reason is None else "reason=" + " ".join(reason.split())[:500] + "\n"  # one line
    tmp.write_text(f"state={state}\nstep={step}\nmax_steps={max_steps}\n{why}")
    os.replace(tmp, path)  # the batch script never reads a half-written file


def _latest_step(output_dir: Path) -> int:
    pointer = output_dir / "checkpoints" / "latest"
    try:
        return int(pointer.read_text().strip().removeprefix("iter_"))
    except (OSError, ValueError):
        return 0


def _requeue_now(signum: int) -> None:
    output_dir, max_steps, rank = (_armed[k] for k in ("output_dir", "max_steps", "rank"))
    name = signal.Signals(signum).name
    print(f"[ualm] {name} received during start-up (rank {rank}): nothing trained yet, exiting for a requeue",
          file=sys.stderr, flush=True)
    # every rank writes (the same content, atomically): a rank still starting may exit while another has already
    # begun its first step and then dies in a collective without it (seen with a real Slurm under load); the
    # state then still says preempted at the latest checkpoint, and the batch script requeues
    write_run_state(output_dir, "preempted", _latest_step(Path(output_dir)), int(max_steps))
    os._exit(0)  # no clean-up to wait for: nothing was trained in this job


def _handler(signum, frame) -> None:
    _received.append(signum)
    requeue_now(signum)


def install() -> None:
    """Record SIGUSR1/SIGTERM instead of dying (call on the entry script's first lines)."""
    for signum in SIGNALS:
        signal.signal(signum, _handler)


def arm(output_dir: str | Path, max_steps: int, rank: int) -> None:
    """From now until training starts, a signal (already received or new) means: record preempted, exit 0."""
    if signal.getsignal(signal.SIGUSR1) is not _handler:
        return  # install() was not called (e.g. a library caller): keep their handlers
    _armed.update(output_dir=str(output_dir), max_steps=max_steps, rank=rank)
    if _received:
        _requeue_now(_received[0])


def is_armed() -> bool:
    return bool(_armed)


def requeue_now(signum: int) -> None:
    """Act on ``signum`` as a start-up signal (armed only): record preempted, this task exits 0."""
    if _armed:
        _requeue_now(signum)


def disarm() -> None:
    """Training has started: the preemption callback's handlers decide from now on (it saves first)."""
    _armed.clear()


def received() -> list[int]:
    """Signals recorded so far (for logs and tests)."""
    return list(_received)
