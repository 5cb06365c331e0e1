"""Find every process a test started, wherever it ended up (a new session, or adopted by PID 1): each inherits a
marker in its environment, so a kill test can prove that nothing of a killed run is left."""

from __future__ import annotations

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
