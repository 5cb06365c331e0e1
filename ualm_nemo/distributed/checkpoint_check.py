"""Is an iteration folder a complete checkpoint? Damage named by file, found before any load starts.

Saves are atomic (checkpoint.py), yet a disk that fills up, a copy cut short or a file system fault can still
leave a damaged ``iter_*``: a truncated shard, a missing ``common.pt``. Loading one fails deep inside torch with a
bare ``EOFError`` or an ``AttributeError``. ``damage`` reads only headers and small files (no tensor data): every
file the load needs exists and unpickles, and each ``*.distcp`` shard is as long as the shard index says.
Training falls back to the newest complete checkpoint, saying so (``find_resumable``); the converters and
inference stop with the file, the problem and what to do (``check_checkpoint``).
"""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import torch

log = logging.getLogger(__name__)

REQUIRED = ("ualm_common.pt", "common.pt", "metadata.json", ".metadata")  # ours, megatron's, megatron's, torch DCP's


class DamagedCheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message names the file and what to do."""


def damage(iteration: str | Path) -> str | None:
    """The first problem of ``iteration`` as "FILE: what is wrong", or None when it looks complete."""
    path = Path(iteration)
    for name in REQUIRED:
        if not (path / name).is_file():
            return f"{path / name}: missing"
    for name in ("ualm_common.pt", "common.pt"):
        try:
            torch.load(path / name, weights_only=False, map_location="cpu")
        except Exception as e:  # EOFError, UnpicklingError, RuntimeError (zip): all mean the same here
            return f"{path / name}: unreadable ({type(e).__name__}: {str(e).split('. ')[0]}), truncated or corrupt"
    try:
        json.loads((path / "metadata.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        return f"{path / 'metadata.json'}: not valid JSON ({e})"
    try:
        with open(path / ".metadata", "rb") as f:
            index = pickle.load(f)
    except Exception as e:
        return f"{path / '.metadata'}: unreadable ({type(e).__name__}: {e}), truncated or corrupt"
    needed: dict[str, int] = {}
    for info in (getattr(index, "storage_data", None) or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        shard = path / name
        if not shard.is_file():
            return f"{shard}: missing (the shard index lists it)"
        if shard.stat().st_size < size:
            return f"{shard}: truncated ({shard.stat().st_size} bytes, the shard index needs {size})"
    return None


def _complete_before(iteration: Path) -> Path | None:
    """The newest complete ``iter_*`` of the same run older than ``iteration``."""
    older = sorted((p for p in iteration.parent.glob("iter_*")
                    if p.is_dir() and not p.name.endswith(".tmp") and p.name < iteration.name), reverse=True)
    return next((p for p in older if damage(p) is None), None)


def check_checkpoint(iteration: str | Path) -> None:
    """Raise DamagedCheckpointError naming the damaged file and the way out (an older complete checkpoint)."""
    iteration = Path(iteration)
    problem = damage(iteration)
    if problem is None:
        return
    previous = _complete_before(iteration)
    todo = (f"to use the previous complete checkpoint, write '{previous.name}' into {iteration.parent / 'latest'} "
            f"(or pass {previous})" if previous is not None else "no older complete checkpoint exists here")
    raise DamagedCheckpointError(f"checkpoint {iteration} is damaged: {problem}; {todo}")


def find_resumable(root: str | Path) -> Path | None:
    """The checkpoint a training run resumes from: ``latest`` if complete, else the newest complete older one
    (with a warning naming the damaged file); None for a new run. Raises when no complete one is left."""
    from ualm_nemo.distributed.checkpoint import find_latest

    latest = find_latest(root)
    if latest is None:
        return None
    problem = damage(latest)
    if problem is None:
        return latest
    previous = _complete_before(latest)
    if previous is None:
        raise DamagedCheckpointError(f"cannot resume: checkpoint {latest} is damaged ({problem}) and no older "
                                     f"complete checkpoint exists; delete {Path(root)} to start over")
    log.warning("checkpoint %s is damaged (%s): resuming from the previous complete checkpoint %s", latest, problem,
                previous)
    return previous
