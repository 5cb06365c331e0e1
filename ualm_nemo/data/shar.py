"""Lhotse Shar shards of one source: layout, an atomic per-shard writer, and random access for the loader.

A source folder (what ``sources[].shar_dir`` names in conf/data/shar.yaml)::

    {source}/shards/cuts.000007.jsonl.gz        standard Lhotse Shar (CutSet.from_shar(in_dir=.../shards) reads it)
    {source}/shards/recording.000007.tar        flac, 16 kHz (audio tasks)
    {source}/shards/codec_tokens.000007.tar     int16 [T, 8] at 50 Hz, a TemporalArray (frame_shift 0.02); for
                                                conversation / preference cuts a plain Array (the written clips'
                                                and codes files' frames back to back, spans in the cut: cuts.py)
    {source}/meta/000007.json                   {"num_cuts", "num_rejects", "audio_seconds", "fields"}: shard done
    {source}/meta/rejects.000007.jsonl          cuts whose audio failed to load or encode, with the reason

A shard is written to a temporary folder, its files renamed into ``shards/`` (the cuts file last), then its meta
file written: a shard without meta is unfinished and is rewritten by the next run. Meta lives outside
``shards/`` because Lhotse treats every name there as a field.

``ShardReader`` gives random access, ``(shard, offset) -> Cut`` with its fields attached, by indexing each tar
(members are found by name, read with one seek). Random access is what makes the loader's order a pure function
of (seed, rank, sample index), hence exactly resumable (shar_dataset.py).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tarfile
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Sequence

from lhotse import CutSet
from lhotse.cut import Cut
from lhotse.serialization import decode_json_line, deserialize_item
from lhotse.shar.utils import fill_shar_placeholder
from lhotse.shar.writers.shar import SharWriter

CODEC_FIELD = "codec_tokens"
FRAME_SHIFT = 0.02  # 50 Hz codec frames


def shards_dir(source_dir: str | Path) -> Path:
    return Path(source_dir) / "shards"


def meta_path(source_dir: str | Path, shard: int) -> Path:
    return Path(source_dir) / "meta" / f"{shard:06d}.json"


def shard_done(source_dir: str | Path, shard: int) -> bool:
    return meta_path(source_dir, shard).is_file()


def write_shard(cuts: Sequence[Cut], source_dir: str | Path, shard: int, fields: dict[str, str],
                rejects: Sequence[dict] = ()) -> dict:
    """Write ``cuts`` (data loadable: audio, codec tokens) as shard number ``shard``; returns its meta."""
    source_dir = Path(source_dir)
    final = shards_dir(source_dir)
    final.mkdir(parents=True, exist_ok=True)
    (source_dir / "meta").mkdir(exist_ok=True)
    tmp = source_dir / f".tmp-{shard:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with SharWriter(str(tmp), fields=fields, shard_size=len(cuts) + 1, shard_offset=shard,
                    warn_unused_fields=False) as writer:
        for cut in cuts:
            writer.write(cut)
    if not cuts:  # every cut rejected: SharWriter opens no file, but Lhotse wants each field in every shard
        _write_empty_shard(tmp, shard, fields)
    names = sorted(os.listdir(tmp), key=lambda n: n.startswith("cuts."))  # the cuts file lands last
    for name in names:
        os.replace(tmp / name, final / name)
    shutil.rmtree(tmp, ignore_errors=True)
    rejects_file = source_dir / "meta" / f"rejects.{shard:06d}.jsonl"
    if rejects:
        with open(rejects_file, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rejects)
    else:
        rejects_file.unlink(missing_ok=True)  # left by an earlier, killed attempt at this shard
    meta = {"num_cuts": len(cuts), "num_rejects": len(rejects), "fields": sorted(fields),
            "audio_seconds": round(sum(c.duration for c in cuts), 3)}
    part = meta_path(source_dir, shard).with_suffix(".json.tmp")
    part.write_text(json.dumps(meta) + "\n", encoding="utf-8")
    os.replace(part, meta_path(source_dir, shard))
    return meta


def _write_empty_shard(folder: Path, shard: int, fields: dict[str, str]) -> None:
    """An empty cuts file and one empty file per field: Lhotse's readers (``CutSet.from_shar``) count the shards
    of every field and refuse a folder where one field has fewer ("Expected 3 shards ... but found 2")."""
    with gzip.open(folder / f"cuts.{shard:06d}.jsonl.gz", "wt"):
        pass
    for name, kind in fields.items():
        if kind == "jsonl":  # Lhotse's JsonlShardWriter
            with gzip.open(folder / f"{name}.{shard:06d}.jsonl.gz", "wt"):
                pass
        else:  # every other format is a TarWriter
            tarfile.open(folder / f"{name}.{shard:06d}.tar", "w").close()


def remove_leftovers(source_dir: str | Path, shards: Iterable[int]) -> int:
    """Remove what killed attempts at ``shards`` left behind (their temporary folders and meta parts); returns
    how many. Only this process's shards: other processes may be writing theirs right now."""
    source_dir = Path(source_dir)
    removed = 0
    for shard in shards:
        for tmp in source_dir.glob(f".tmp-{shard:06d}-*"):
            shutil.rmtree(tmp, ignore_errors=True)
            removed += 1
        part = meta_path(source_dir, shard).with_suffix(".json.tmp")
        if part.is_file():
            part.unlink()
            removed += 1
    return removed


def read_shar(source_dir: str | Path) -> CutSet:
    """The whole source through Lhotse's own Shar reader (lazy, shard order)."""
    return CutSet.from_shar(in_dir=str(shards_dir(source_dir)))


# --------------------------------------------------------------------------------------------- index


def _shard_ids(source_dir: Path) -> list[int]:
    return sorted(int(p.name.split(".")[1]) for p in shards_dir(source_dir).glob("cuts.*.jsonl.gz"))


def _count_lines(path: Path) -> int:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def shard_counts(source_dir: str | Path) -> dict[int, int]:
    """{shard id: number of cuts} of the finished shards (meta files; Shar folders made elsewhere: counted)."""
    source_dir = Path(source_dir)
    if not shards_dir(source_dir).is_dir():
        raise FileNotFoundError(f"{str(source_dir)!r} has no shards/ folder: run examples/tokenize_audio.py first")
    counts = {}
    for shard in _shard_ids(source_dir):
        meta = meta_path(source_dir, shard)
        if meta.is_file():
            counts[shard] = int(json.loads(meta.read_text())["num_cuts"])
        elif not (source_dir / "meta").is_dir():  # a plain Shar folder: every shard present is complete
            counts[shard] = _count_lines(shards_dir(source_dir) / f"cuts.{shard:06d}.jsonl.gz")
    return counts


def source_task(source_dir: str | Path) -> str | None:
    """The task of a source (``custom["task"]`` of its first cut; a source holds one task), None if it is empty."""
    folder = shards_dir(source_dir)
    for shard in _shard_ids(Path(source_dir)):
        with gzip.open(folder / f"cuts.{shard:06d}.jsonl.gz", "rt", encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    return (json.loads(line).get("custom") or {}).get("task")
    return None


def read_rejects(source_dir: str | Path) -> list[dict]:
    out = []
    for p in sorted((Path(source_dir) / "meta").glob("rejects.*.jsonl")):
        out += [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    return out


# --------------------------------------------------------------------------------------------- random access


class _OpenShard:
    def __init__(self, folder: Path, shard: int):
        with gzip.open(folder / f"cuts.{shard:06d}.jsonl.gz", "rt", encoding="utf-8") as f:
            self.cuts = [line for line in f if line.strip()]  # deserialised on access
        # field -> (tar, {cut id: (data member, meta member)}); Shar writes each item as data then meta
        self.tars: dict[str, tuple[tarfile.TarFile, dict[str, tuple[tarfile.TarInfo, tarfile.TarInfo]]]] = {}
        for path in sorted(folder.glob(f"*.{shard:06d}.tar")):
            tar = tarfile.open(path, mode="r:")  # seekable: members by offset, no sequential scan of the data
            members = tar.getmembers()
            index = {}
            for data, meta in zip(members[0::2], members[1::2]):
                if meta.name.endswith(".json"):  # ".nometa": the cut has no value for this field
                    index[meta.name[: -len(".json")]] = (data, meta)
            self.tars[path.name.split(".")[0]] = (tar, index)

    def close(self) -> None:
        for tar, _ in self.tars.values():
            tar.close()

    def get(self, offset: int) -> Cut:
        cut = deserialize_item(decode_json_line(self.cuts[offset]))
        for field, (tar, index) in self.tars.items():
            if cut.id not in index:
                continue
            data_member, meta = index[cut.id]
            manifest = deserialize_item(decode_json_line(tar.extractfile(meta).read().decode("utf-8")))
            fill_shar_placeholder(manifest=manifest, data=tar.extractfile(data_member).read(),
                                  tarpath=data_member.name)
            setattr(cut, field, manifest)
        return cut


class ShardReader:
    """``reader.get(shard, offset)``: the offset-th cut of a shard, fields attached; keeps a few shards open."""

    def __init__(self, source_dir: str | Path, max_open: int = 4):
        self.folder = shards_dir(source_dir)
        self.max_open = max_open
        self._open: OrderedDict[int, _OpenShard] = OrderedDict()

    def _shard(self, shard: int) -> _OpenShard:
        if shard in self._open:
            self._open.move_to_end(shard)
        else:
            self._open[shard] = _OpenShard(self.folder, shard)
            if len(self._open) > self.max_open:
                self._open.popitem(last=False)[1].close()
        return self._open[shard]

    def get(self, shard: int, offset: int) -> Cut:
        return self._shard(shard).get(offset)

    def get_many(self, refs: Iterable[tuple[int, int]]) -> list[Cut]:
        return [self.get(s, o) for s, o in refs]

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()

    def __getstate__(self):  # DataLoader workers get a fresh reader (open tar files do not pickle)
        return {"folder": self.folder, "max_open": self.max_open}

    def __setstate__(self, state):
        self.folder, self.max_open = state["folder"], state["max_open"]
        self._open = OrderedDict()
