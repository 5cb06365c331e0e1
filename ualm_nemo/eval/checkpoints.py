"""Metric-model checkpoints: user-supplied local files, never a hub download.

Every metric model is built from its architecture (random weights) and then given the weights of a local file.
A missing path is a ``MetricModelError`` naming the flag and the path before anything is built; files are
read with ``torch.load(weights_only=True)`` (no code from a checkpoint runs). Reports record each file's sha256
so a figure can be traced to the exact weights.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch


class MetricModelError(ValueError):
    """A metric model that cannot be used (missing file, wrong keys); the message names the path."""


def require_file(path: str | Path | None, what: str) -> Path:
    """``path`` as an existing file, or a MetricModelError naming ``what`` (the flag)."""
    if path is None:
        raise MetricModelError(f"{what}: no checkpoint given (metric models are local files, never downloaded)")
    path = Path(path)
    if not path.is_file():
        raise MetricModelError(f"{what} {path}: no such checkpoint file (metric models are never downloaded)")
    return path


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_weights(path: Path, what: str, key: str | None = None) -> dict[str, Any]:
    """The file's state dict (under ``key`` when the file is a dict holding one there, as PANNs' ``model`` and
    LAION-CLAP's ``state_dict``); a DataParallel ``module.`` prefix is dropped."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling refusals, truncated files: one message naming the file
        raise MetricModelError(f"{what} {path}: cannot load as a weights-only torch checkpoint ({err})"[:600]) \
            from None
    if key is not None and isinstance(obj, dict) and isinstance(obj.get(key), dict):
        obj = obj[key]
    if not isinstance(obj, dict) or not obj:
        raise MetricModelError(f"{what} {path}: not a state dict")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_strict(module: torch.nn.Module, state: dict[str, Any], path: Path, what: str,
                ignore: tuple[str, ...] = ()) -> None:
    """``module.load_state_dict(state)`` with every missing/unexpected key reported (``ignore``: key prefixes
    that are expected extras, e.g. buffers the library recomputes)."""
    state = {k: v for k, v in state.items() if not k.startswith(ignore)}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise MetricModelError(f"{what} {path}: weights do not fit the model: {err}"[:1200]) from None
