"""Raw manifests -> Lhotse CutSets (the first stage of the Shar pipeline), with every rejected entry reported.

The raw readers (raw.py) validate each entry; this module turns the valid records into cuts and writes, per
source, a *prepared* folder::

    {out}/cuts.jsonl.gz     lazy Lhotse manifest: cuts referencing the raw audio (no audio copied yet)
    {out}/rejects.jsonl     {"source": "file:line", "reason": ...} per rejected entry
    {out}/summary.json      {"task", "manifest", "num_records", "num_rejects", "audio_seconds"}

``len(cuts) + len(rejects)`` is always the entry count: nothing valid is dropped, nothing bad passes silently.

A cut carries its task and text in ``cut.custom`` (so new sources need no code, only a manifest)::

    task          "tta" | "understanding" | "text"
    caption       str                           (tta)
    conversation  [[role, text], ...]           (understanding: one user turn holds raw.AUDIO_TAG; text)
    origin        str  raw entry id or manifest position, for tracing a sample back to its source

Audio: a TTA cut is the ``[start, end)`` segment of its file; every audio cut is resampled to 16 kHz (lazily:
the samples are read when the codec stage writes the shards). Multi-channel files stay multi-channel here and
are downmixed (channel mean, as raw.load_audio does) wherever samples are consumed. Text cuts have no
recording and duration 0.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from lhotse import CutSet, MonoCut, Recording
from lhotse.cut import Cut

from ualm_nemo.data.raw import (ReadResult, Record, Reject, TextRecord, TTARecord, Turn, UnderstandingRecord,
                                read_text_manifest, read_tta_manifest, read_understanding_manifest)
from ualm_nemo.model.audio_frames import SAMPLE_RATE

TASKS = ("tta", "understanding", "text")
READERS = {"tta": read_tta_manifest, "understanding": read_understanding_manifest, "text": read_text_manifest}


# --------------------------------------------------------------------------------------------- record -> cut


def _audio_cut(path: Path, cut_id: str, start: float = 0.0, end: float | None = None) -> Cut:
    recording = Recording.from_file(str(path), recording_id=cut_id)
    cut = recording.to_cut()
    if start > 0 or (end is not None and end < recording.duration):
        stop = recording.duration if end is None else min(end, recording.duration)  # raw allows 10 ms overshoot
        cut = cut.truncate(offset=start, duration=stop - start, preserve_id=True)
    if recording.sampling_rate != SAMPLE_RATE:
        cut = cut.resample(SAMPLE_RATE)
    return cut.with_id(cut_id)


def record_to_cut(record: Record, cut_id: str) -> Cut:
    """One validated record -> a cut (see the module docstring for its custom fields)."""
    if isinstance(record, TTARecord):
        cut = _audio_cut(record.audio_path, cut_id, record.start, record.end)
        cut.custom = {"task": "tta", "caption": record.caption, "origin": f"{record.audio_path.name}@{record.start}"}
    elif isinstance(record, UnderstandingRecord):
        cut = _audio_cut(record.audio_path, cut_id)
        cut.custom = {"task": "understanding", "conversation": [list(t) for t in record.turns],
                      "origin": record.id or record.audio_path.name}
    elif isinstance(record, TextRecord):
        cut = MonoCut(id=cut_id, start=0.0, duration=0.0, channel=0, recording=None,
                      custom={"task": "text", "conversation": [list(t) for t in record.turns], "origin": cut_id})
    else:
        raise TypeError(f"unknown record type {type(record).__name__}")
    return cut


def records_to_cuts(records: Iterable[Record], prefix: str) -> CutSet:
    """Cuts with ids ``{prefix}-{k:08d}`` in record order (unique within a source, stable across runs)."""
    return CutSet.from_cuts(record_to_cut(r, f"{prefix}-{k:08d}") for k, r in enumerate(records))


# --------------------------------------------------------------------------------------------- cut -> fields


def cut_task(cut: Cut) -> str:
    task = (cut.custom or {}).get("task")
    if task not in TASKS:
        raise ValueError(f"cut {cut.id} has task {task!r}; expected one of {TASKS} (was it made by cuts.py?)")
    return task


def cut_turns(cut: Cut) -> tuple[Turn, ...]:
    return tuple((str(role), str(text)) for role, text in cut.custom["conversation"])


def cut_caption(cut: Cut) -> str:
    return str(cut.custom["caption"])


def cut_waveform(cut: Cut) -> torch.Tensor:
    """Float32 mono [samples] at 16 kHz (channel mean, like raw.load_audio)."""
    if cut.sampling_rate != SAMPLE_RATE:
        cut = cut.resample(SAMPLE_RATE)
    audio = cut.load_audio()  # [channels, samples]
    return torch.from_numpy(np.ascontiguousarray(audio.mean(axis=0), dtype=np.float32))


# --------------------------------------------------------------------------------------------- prepare


@dataclass(frozen=True)
class PrepareReport:
    task: str
    manifest: str
    num_records: int
    num_rejects: int
    audio_seconds: float
    out_dir: str


def read_manifest(task: str, manifest: str | Path) -> ReadResult:
    if task not in READERS:
        raise ValueError(f"unknown task {task!r}: expected one of {TASKS}")
    return READERS[task](manifest)


def write_rejects(path: str | Path, rejects: Iterable[Reject]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for r in rejects:
            f.write(json.dumps({"source": r.source, "reason": r.reason}) + "\n")
            n += 1
    return n


def split_by_duration(records: Iterable[Record], prefix: str, max_duration: float | None
                      ) -> tuple[CutSet, list[Reject]]:
    """Cuts of the records no longer than ``max_duration`` seconds (ids as ``records_to_cuts`` gives them, so
    a cut keeps its id whatever the limit), and a Reject naming each longer one."""
    cuts, rejects = [], []
    for k, record in enumerate(records):
        cut = record_to_cut(record, f"{prefix}-{k:08d}")
        if max_duration is not None and cut.duration > max_duration:
            rejects.append(Reject(record.source, f"duration {cut.duration:.3f} s is longer than "
                                                 f"--max-duration {max_duration:g} s"))
        else:
            cuts.append(cut)
    return CutSet.from_cuts(cuts), rejects


def prepare_source(task: str, manifest: str | Path, out_dir: str | Path, name: str | None = None,
                   max_duration: float | None = None) -> PrepareReport:
    """Read and validate one raw manifest; write its cuts, rejects and summary under ``out_dir``.

    ``max_duration`` (seconds) rejects longer audio: clips far beyond what training's ``seq_len`` holds would
    only be encoded by the codec stage to be skipped later.
    """
    if max_duration is not None and not max_duration > 0:
        raise ValueError(f"max_duration={max_duration} must be a positive number of seconds")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = read_manifest(task, manifest)
    cuts, too_long = split_by_duration(result.records, name or task, max_duration)
    cuts.to_file(out / "cuts.jsonl.gz")
    num_rejects = write_rejects(out / "rejects.jsonl", [*result.rejects, *too_long])
    report = PrepareReport(task=task, manifest=str(manifest), num_records=len(cuts), num_rejects=num_rejects,
                           audio_seconds=round(sum(c.duration for c in cuts), 3), out_dir=str(out))
    (out / "summary.json").write_text(json.dumps(asdict(report), indent=1) + "\n", encoding="utf-8")
    return report
