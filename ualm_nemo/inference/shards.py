"""Split one batch-generation job (an evaluation, a generate.py run) over many processes, then merge it back.

A job's items go to ``--shard K/N`` by position (item ``i`` to shard ``i % N``), and each shard writes its own
job folder, ``<folder>/shard-K-of-N/`` (inference/jobs.py: resumable, locked while it runs), so shards on many
nodes never append to one manifest. ``--shard slurm`` takes K and N from a Slurm array job
(``sbatch --array=0-7``). The unsharded command on the same folder then merges every finished shard into the
folder (wavs moved, manifest lines kept), generates whatever a failed shard left undone, and scores.

Merging survives being killed at any point: wavs are moved first (a wav without a manifest line is not "done"),
then the merged manifest replaces the old one atomically, and only then is the shard folder removed; a rerun
finds each item's wav in the shard or in the folder and merges it once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence, TypeVar

from ualm_nemo.inference.jobs import MANIFEST, JobError, ManifestConflict, OutputFolder, readable_wav

T = TypeVar("T")
SHARD_HELP = ("generate only shard K of N (0 <= K < N; items K, K+N, ...) into <out>/shard-K-of-N/, or 'slurm': "
              "K and N from the Slurm array (sbatch --array=0-<N-1>). Then run the command without --shard to "
              "merge the shards, finish what is missing and score")
_FOLDER = re.compile(r"shard-(\d+)-of-(\d+)")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based)."""

    index: int
    count: int

    def select(self, items: Sequence[T]) -> list[T]:
        return list(items[self.index::self.count])

    def folder(self, base: str | Path) -> Path:
        return Path(base) / f"shard-{self.index}-of-{self.count}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str, environ: Mapping[str, str] = os.environ) -> Shard:
    """``"K/N"`` or ``"slurm"`` (this task of a contiguous Slurm array) -> Shard; a ValueError says what is wrong."""
    if text == "slurm":
        return _slurm_shard(environ)
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise ValueError(f"{text!r}: expected K/N (e.g. 0/4) or 'slurm'")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or index >= count:
        raise ValueError(f"{text!r}: needs N >= 1 and 0 <= K < N")
    return Shard(index, count)


def _slurm_shard(environ: Mapping[str, str]) -> Shard:
    try:
        task, first, last, count = (int(environ[f"SLURM_ARRAY_TASK_{k}"]) for k in ("ID", "MIN", "MAX", "COUNT"))
        step = int(environ.get("SLURM_ARRAY_TASK_STEP", "1"))
    except KeyError:
        raise ValueError("'slurm': this is not a task of a Slurm array job (no SLURM_ARRAY_TASK_ID, ...): submit "
                         "with sbatch --array=0-<N-1>, or give K/N") from None
    except ValueError:
        raise ValueError("'slurm': unreadable SLURM_ARRAY_TASK_* variables") from None
    if step < 1 or (last - first) // step + 1 != count or (task - first) % step:
        raise ValueError(f"'slurm': the array ({first}-{last}, step {step}, {count} tasks) is not one contiguous "
                         "range: submit with --array=0-<N-1> (a %limit is fine)")
    return Shard((task - first) // step, count)


def shard_folders(base: str | Path) -> list[Path]:
    """The shard folders a job folder holds, in shard order."""
    base = Path(base)
    found = [p for p in base.glob("shard-*-of-*") if p.is_dir() and _FOLDER.fullmatch(p.name)] if base.is_dir() \
        else []
    return sorted(found, key=lambda p: tuple(int(g) for g in _FOLDER.fullmatch(p.name).groups()))


def merge_shards(base: str | Path, settings: Mapping[str, object]) -> list[str]:
    """Merge every shard folder of ``base`` into it; returns what to tell the user (one line per shard).

    A shard still running holds its lock: JobError (nothing is merged). A shard made with other settings:
    ManifestConflict naming it. Items whose wav is nowhere (a shard killed mid-write) are left to be redone."""
    base = Path(base)
    shards = shard_folders(base)
    if not shards:
        return []
    notes = []
    with OutputFolder(base, settings) as main:  # the folder's lock, then each shard's
        merged, _, torn = main.read_manifest()
        notes += torn
        held = []
        try:
            for path in shards:
                shard = OutputFolder(path, settings)
                held.append(shard.__enter__())
                entries, _, torn = shard.read_manifest()
                notes += torn
                _check_settings(path, entries, settings)
                lost = 0
                for item_id, entry in entries.items():
                    if "audio" in entry and not _move_wav(path / entry["audio"], base / entry["audio"]):
                        lost += 1
                        continue
                    merged[item_id] = entry
                notes.append(f"merged shard {path.name}: {len(entries) - lost} finished items"
                             + (f" ({lost} without their wav, to be redone)" if lost else ""))
            _write_manifest(base, merged.values())
            for path in shards:
                shutil.rmtree(path)
        finally:
            for shard in held:
                shard.close()
    return notes


def _check_settings(path: Path, entries: Mapping[str, dict], settings: Mapping[str, object]) -> None:
    for item_id, entry in entries.items():
        diff = [f"{k} {entry.get(k)!r} (here {v!r})" for k, v in settings.items() if entry.get(k) != v]
        if diff:
            raise ManifestConflict(f"{path}: item {item_id} was made with other settings ({', '.join(diff)}): "
                                   "remove that shard folder, or merge it with the settings it was made with")


def _move_wav(source: Path, target: Path) -> bool:
    """The item's wav into the folder; True when the folder has it afterwards (moved now or by a killed merge)."""
    if readable_wav(source):
        os.replace(source, target)
        return True
    return readable_wav(target)


def _write_manifest(base: Path, entries) -> None:
    tmp = base / f".{MANIFEST}.merge"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(e, ensure_ascii=False) + "\n" for e in entries)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, base / MANIFEST)
    fd = os.open(base, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def shard_job(base: str | Path, items: Sequence[T], settings: Mapping[str, object], shard: Shard | None,
              overwrite: bool = False) -> tuple[Path, list[T], list[str]]:
    """(the folder this run writes, the items it does, notes for the user): a sharded run its shard's folder and
    share; an unsharded one ``base`` (its finished shards merged in first) and every item."""
    folder, notes = _job_folder(base, settings, shard, overwrite)
    return folder, _shard_items(items, shard, base), notes


def _job_folder(base: str | Path, settings: Mapping[str, object], shard: Shard | None,
                overwrite: bool = False) -> tuple[Path, list[str]]:
    """(the folder this run writes, notes): its shard's folder, or ``base`` once base's finished shards are
    merged into it (discarded instead with ``overwrite``: starting over means every shard too)."""
    if shard is not None:
        return shard.folder(base), []
    if overwrite:
        return Path(base), [f"discarded shard {p.name}" for p in _discard_shards(base)]
    return Path(base), merge_shards(base, settings)


def _discard_shards(base: str | Path) -> list[Path]:
    shards = shard_folders(base)
    for path in shards:
        with OutputFolder(path, {}):  # a running shard holds its lock: JobError, nothing removed
            shutil.rmtree(path)
    return shards


def _shard_items(items: Sequence[T], shard: Shard | None, base: str | Path) -> list[T]:
    """The items this run does: all of them, or its shard's share less those the folder already holds."""
    if shard is None:
        return list(items)
    done, _, _ = OutputFolder(base, {}).read_manifest()
    return [i for i in shard.select(items) if i.id not in done]


def refuse_unmerged(base: str | Path, what: str) -> None:
    """A folder with shard folders left in it is not a finished job: say how to finish it."""
    left = shard_folders(base)
    if left:
        raise JobError(f"{what} {base} holds {len(left)} unmerged shard folder(s) ({left[0].name}, ...): run the "
                       "generating command without --shard on it first, to merge them")


__all__ = ["SHARD_HELP", "Shard", "merge_shards", "parse_shard", "refuse_unmerged", "shard_folders", "shard_job"]
