"""Enhancer checkpoints: ``<output_dir>/checkpoints/iter_NNNNNNN.ckpt`` plus a ``latest`` pointer file.

Written to a temporary name and renamed, so a kill during a save never leaves a half file under a real name.
Loading walks back from ``latest`` to the newest file that reads, saying which file was damaged and why.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)


def name(step: int) -> str:
    return f"iter_{step:07d}"


def path_for(root: Path, step: int) -> Path:
    return root / f"{name(step)}.ckpt"


def candidates(root: Path) -> list[Path]:
    """Checkpoint files, newest first (the ``latest`` pointer's first when it names one)."""
    files = sorted(root.glob("iter_*.ckpt"), reverse=True)
    pointer = root / "latest"
    if pointer.is_file():
        named = root / f"{pointer.read_text().strip()}.ckpt"
        if named in files:
            files.remove(named)
            files.insert(0, named)
    return files


def publish(tmp: Path, root: Path, step: int, keep_last: int) -> Path:
    """Rename a finished save into place, point ``latest`` at it, drop the oldest beyond ``keep_last``."""
    final = path_for(root, step)
    os.replace(tmp, final)
    pointer_tmp = root / f"latest.tmp-{os.getpid()}"
    pointer_tmp.write_text(name(step) + "\n")
    os.replace(pointer_tmp, root / "latest")
    for old in sorted(root.glob("iter_*.ckpt"))[:-keep_last]:
        old.unlink(missing_ok=True)
    for stale in root.glob("*.tmp*"):
        if stale.name.startswith("iter_"):
            stale.unlink(missing_ok=True)
    return final


def load_newest(root: Path, load: Callable[[Path], None]) -> Path | None:
    """Call ``load`` on the newest checkpoint that loads; None when there is none at all."""
    errors = []
    for path in candidates(root):
        try:
            load(path)
        except Exception as err:  # a truncated or corrupt file: say so, fall back to the previous one
            errors.append(f"{path.name}: {type(err).__name__}: {err}")
            log.error("checkpoint %s cannot be read (%s: %s); trying the previous one", path, type(err).__name__,
                      err)
            continue
        if errors:
            log.warning("resumed from %s; skipped damaged checkpoint(s): %s", path.name, "; ".join(errors))
        return path
    if errors:
        raise RuntimeError(f"no readable checkpoint in {root}: " + "; ".join(errors) +
                           " -- delete the damaged files to start fresh")
    return None
