"""One index file per Shar source, so a job start reads a few files instead of one meta file per shard per rank.

``{source}/shard_index.json`` holds what the loader needs of a source (shard ids, their cut counts, the task)
and a fingerprint of the source's folder listings::

    {"version": 1, "shards": [0, 1, ...], "counts": [1000, 998, ...], "task": "tta",
     "fingerprint": {"cuts_files": 15000, "meta_files": 15000, "shards_mtime_ns": ..., "meta_mtime_ns": ...}}

Why a listing fingerprint: a shard written, rewritten or removed renames a file into (or out of) ``shards/`` or
``meta/`` (shar.write_shard), which changes that folder's entry count or mtime; checking costs two directory
listings and two stats on the reading rank, no file opens. The fingerprint is taken BEFORE the meta files are
read, so a shard finished while an index is built makes that index stale, never silently short.

The tokenize stage writes the index after its shards (tokenize_stage.tokenize_source); a source without one
(Shar folders made elsewhere, or older runs) gets it built on first use. A stale or unreadable index is said
with its reason and rebuilt; a source folder that cannot be written keeps working from an index built in memory.

``source_indexes`` is what the loader calls: with a process group, the group's first rank reads (or builds) the
indexes and broadcasts them, so the other ranks open no file of the sources' metadata.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ualm_nemo.data.shar import shard_counts, shards_dir, source_task

log = logging.getLogger(__name__)

INDEX_NAME = "shard_index.json"
VERSION = 1


@dataclass(frozen=True)
class ShardIndex:
    """A source's finished shards (id -> number of cuts), its task, and the listing it was built from."""

    counts: dict[int, int]
    task: str | None
    fingerprint: dict[str, int | None]


def index_path(source_dir: str | Path) -> Path:
    return Path(source_dir) / INDEX_NAME


def listing_fingerprint(source_dir: str | Path) -> dict[str, int | None]:
    """Entry counts and mtimes of ``shards/`` and ``meta/``: changes whenever a shard is written or removed."""
    source_dir = Path(source_dir)
    shards, meta = shards_dir(source_dir), source_dir / "meta"
    if not shards.is_dir():
        raise FileNotFoundError(f"{str(source_dir)!r} has no shards/ folder: run examples/tokenize_audio.py first")
    cuts = sum(1 for n in os.listdir(shards) if n.startswith("cuts.") and n.endswith(".jsonl.gz"))
    metas = sum(1 for n in os.listdir(meta) if n[:6].isdigit() and n.endswith(".json")) if meta.is_dir() else None
    return {"cuts_files": cuts, "meta_files": metas, "shards_mtime_ns": shards.stat().st_mtime_ns,
            "meta_mtime_ns": meta.stat().st_mtime_ns if meta.is_dir() else None}


def build_index(source_dir: str | Path) -> ShardIndex:
    """Read every shard's meta (the per-shard path, once) and write the index atomically; returns it."""
    fingerprint = listing_fingerprint(source_dir)  # first: a shard finished meanwhile makes this index stale
    index = ShardIndex(shard_counts(source_dir), source_task(source_dir), fingerprint)
    try:
        _write(source_dir, index)
    except OSError as err:  # a read-only copy of the data: still correct, only built again next time
        log.warning("cannot write %s (%s): using the index built in memory", index_path(source_dir), err)
    return index


def _write(source_dir: str | Path, index: ShardIndex) -> None:
    path = index_path(source_dir)
    shards = sorted(index.counts)
    text = json.dumps({"version": VERSION, "shards": shards, "counts": [index.counts[s] for s in shards],
                       "task": index.task, "fingerprint": index.fingerprint})
    part = path.with_name(f".{INDEX_NAME}.{os.getpid()}.tmp")  # per process: array tasks may finish together
    part.write_text(text + "\n", encoding="utf-8")
    os.replace(part, path)


def _parse(text: str) -> ShardIndex:
    """The index in ``text``; ValueError saying what is wrong with it."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"not JSON ({err})") from None
    if not isinstance(data, dict) or data.get("version") != VERSION:
        raise ValueError(f"version {data.get('version') if isinstance(data, dict) else None!r}, expected {VERSION}")
    shards, counts, fingerprint = data.get("shards"), data.get("counts"), data.get("fingerprint")
    if (not isinstance(shards, list) or not isinstance(counts, list) or len(shards) != len(counts)
            or not all(isinstance(v, int) and v >= 0 for v in shards + counts)):
        raise ValueError("shards / counts are not two lists of non-negative integers of one length")
    if not isinstance(fingerprint, dict) or not isinstance(data.get("task"), (str, type(None))):
        raise ValueError("fingerprint or task missing")
    return ShardIndex(dict(zip(shards, counts)), data["task"], fingerprint)


def load_index(source_dir: str | Path) -> ShardIndex:
    """The source's index: read when present and fresh, else (said why) built and written."""
    path = index_path(source_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        log.info("%s is missing: building it from the shards' meta files (once)", path)
        return build_index(source_dir)
    try:
        index = _parse(text)
    except ValueError as err:
        log.warning("%s is unreadable (%s): rebuilding it from the shards' meta files", path, err)
        return build_index(source_dir)
    now = listing_fingerprint(source_dir)
    if index.fingerprint != now:
        changed = ", ".join(f"{k} {index.fingerprint.get(k)} -> {v}" for k, v in now.items()
                            if index.fingerprint.get(k) != v)
        log.warning("%s is stale (shards changed since it was built: %s): rebuilding it", path, changed)
        return build_index(source_dir)
    return index


def source_indexes(source_dirs: Sequence[str | Path], group: Any = None) -> list[ShardIndex]:
    """``load_index`` of each source, read once per process group (by its first rank) and broadcast.

    Without an initialised torch.distributed this process reads them itself. Every rank of ``group`` (default:
    the world) must call it; an error on the reading rank is raised on every rank (none waits forever).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [load_index(d) for d in source_dirs]
    src = dist.get_global_rank(group, 0) if group is not None else 0
    payload: list[Any] = [None]
    error: BaseException | None = None
    if dist.get_rank() == src:
        try:
            payload = [[load_index(d) for d in source_dirs]]
        except Exception as err:  # noqa: BLE001 -- sent on, then raised here too
            error, payload = err, [f"{type(err).__name__}: {err}"]
    dist.broadcast_object_list(payload, src=src, group=group)
    if error is not None:
        raise error
    if isinstance(payload[0], str):
        raise RuntimeError(f"rank {src} could not read the Shar source indexes: {payload[0]}")
    return list(payload[0])
