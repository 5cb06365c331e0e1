"""Find every process a test started, wherever it ended up (a new session, or adopted by PID 1): each inherits a
marker in its environment, so a kill test can prove that nothing of a killed run is left."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil

MARKER_VAR = "UALM_KILL_TEST"


def marked_processes(marker: str) -> list[psutil.Process]:
    """The live processes whose environment holds ``MARKER_VAR=marker``."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(MARKER_VAR) == marker:
                found.append(proc)
        except (psutil.Error, OSError):  # gone, a zombie, or not ours to read
            pass
    return found


def sigkill_leaves_nothing(proc: subprocess.Popen, marker: str, min_children: int, grace_s: float = 15.0) -> None:
    """SIGKILL the run's main process only (what the OOM killer or a failed node does), then fail unless every
    process carrying ``marker`` is gone within ``grace_s`` (DataLoader workers notice a dead parent within
    torch's 5 s status interval) and none of the ``min_children`` or more children it had is still running."""
    before = psutil.Process(proc.pid).children(recursive=True)
    assert len(before) >= min_children, [p.cmdline() for p in before]
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    killed_at = time.monotonic()
    while (left := marked_processes(marker)) and time.monotonic() - killed_at < grace_s:
        time.sleep(0.2)
    assert left == [], [(p.pid, p.ppid(), " ".join(p.cmdline())[:120]) for p in left]
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in before)


def kill_marked(marker: str) -> None:
    """Never leave a test's process behind, whatever failed: kill every process carrying ``marker``."""
    for p in marked_processes(marker):
        p.kill()
