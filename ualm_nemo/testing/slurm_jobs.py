"""Waiting on and reading real Slurm jobs, shared by the launcher tests (single-node and simulated multi-node)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

# job states after which a job never runs again (what scontrol show job reports at the end)
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE")


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, poll: float = 0.2) -> Any:
    """The predicate's first truthy value, polled every ``poll`` s; an AssertionError naming ``what`` after
    ``timeout`` s (bounded: a test never waits forever on a job)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def job_log(out: Path, job_id: str) -> str:
    """The job's log as written so far (launcher.sbatch: ``<output_dir>/slurm/<job id>.log``), "" before it exists."""
    path = out / "slurm" / f"{job_id}.log"
    return path.read_text(errors="replace") if path.exists() else ""
