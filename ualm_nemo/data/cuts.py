"""Raw manifests -> Lhotse CutSets (the first stage of the Shar pipeline), with every rejected entry reported.

The raw readers (raw.py) validate each entry; this module turns the valid records into cuts and writes, per
source, a *prepared* folder::

    {out}/cuts.jsonl.gz     lazy Lhotse manifest: cuts referencing the raw audio (no audio copied yet)
    {out}/rejects.jsonl     {"source": "file:line", "reason": ...} per rejected entry
    {out}/summary.json      {"task", "manifest", "num_records", "num_rejects", "audio_seconds"}

``len(cuts) + len(rejects)`` is always the entry count: nothing valid is dropped, nothing bad passes silently.

A cut carries its task and text in ``cut.custom`` (so new sources need no code, only a manifest)::

    task          "tta" | "understanding" | "text" | "conversation" | "preference"
    caption       str                           (tta)
    conversation  [[role, text], ...]           (understanding: one user turn holds raw.AUDIO_TAG; text)
    origin        str  raw entry id or manifest position, for tracing a sample back to its source

Post-training records (data/conversation.py: an SFT conversation, a DPO preference pair) become ONE cut each,
whatever their number of clips. Its recording (written by the codec stage) is every distinct clip (by
``AudioRef.key``, in order of first reference: prompt / turns, then chosen, then rejected) read as
``raw.load_audio`` reads it (16 kHz mono) and concatenated; its ``codec_tokens`` are every WRITTEN clip encoded
on its own, then every codes file, concatenated along frames. The fields (all known at preparation, from the
audio headers and codes shapes, so lengths need no audio)::

    origin        str   the record id (a pair's id: what DPO reference log-probs are keyed by)
    source        str   file:line of the record
    clips         [{"path", "start", "end", "samples": [a, b], "frames": [a, b] | null}, ...]
                        samples: the clip's span in the recording; frames: its span in codec_tokens when
                        written (an assistant turn's audio part), else null
    codes         [{"path", "frames": [a, b]}, ...]     codes files, carried verbatim inside codec_tokens
    turns         [{"role", "learn", "parts": [part, ...]}, ...]   (conversation: the record's turns;
                                                                    preference: its prompt)
    chosen, rejected  [part, ...]                       (preference: the two assistant contents)
    scores        any JSON                              (preference: kept, not used)

with a part ``{"text": str}`` | ``{"clip": i}`` (clips[i]; heard in a system / user turn, written in an
assistant turn) | ``{"codes": j}``. ``cut_record`` rebuilds the very ``ConversationRecord`` /
``PreferenceRecord`` the manifest reader gave (so the Shar loader and the in-memory datasets format through
the same functions, posttrain_dataset.py); ``CutClips`` serves its clips from the cut. The cut's duration is
the recording's (0 when the record has no audio).

Audio: a TTA cut is the ``[start, end)`` segment of its file; every audio cut is resampled to 16 kHz (lazily:
the samples are read when the codec stage writes the shards). Multi-channel files stay multi-channel here and
are downmixed (channel mean, as raw.load_audio does) wherever samples are consumed. Text cuts have no
recording and duration 0.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from lhotse import CutSet, MonoCut, Recording
from lhotse.cut import Cut

from ualm_nemo.codec.xcodec import num_codec_frames
from ualm_nemo.data.conversation import (AudioRef, CodesRef, ContentPart, ConversationRecord, ConversationTurn,
                                         PreferenceRecord, TextPart, read_conversation_manifest,
                                         read_preference_manifest)
from ualm_nemo.data.formatting import AudioIn, AudioInLength, AudioOut, AudioOutLength
from ualm_nemo.data.raw import (ReadResult, Record, Reject, TextRecord, TTARecord, Turn, UnderstandingRecord,
                                num_samples_loaded, read_text_manifest, read_tta_manifest,
                                read_understanding_manifest)
from ualm_nemo.data.shar import CODEC_FIELD
from ualm_nemo.model.audio_frames import SAMPLE_RATE

TASKS = ("tta", "understanding", "text", "conversation", "preference")
POSTTRAIN_TASKS = ("conversation", "preference")
READERS = {"tta": read_tta_manifest, "understanding": read_understanding_manifest, "text": read_text_manifest,
           "conversation": read_conversation_manifest, "preference": read_preference_manifest}
PostTrainRecord = ConversationRecord | PreferenceRecord


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
    elif isinstance(record, (ConversationRecord, PreferenceRecord)):
        cut = posttrain_cut(record, cut_id)
    else:
        raise TypeError(f"unknown record type {type(record).__name__}")
    return cut


def _record_turns(record: PostTrainRecord) -> tuple[ConversationTurn, ...]:
    return record.turns if isinstance(record, ConversationRecord) else record.prompt


def _all_parts(record: PostTrainRecord) -> Iterable[tuple[str, ContentPart]]:
    """(role, part) of every part, in the order the clips are numbered."""
    for turn in _record_turns(record):
        for part in turn.parts:
            yield turn.role, part
    if isinstance(record, PreferenceRecord):
        for part in (*record.chosen, *record.rejected):
            yield "assistant", part


def posttrain_cut(record: PostTrainRecord, cut_id: str) -> Cut:
    """A conversation or preference record -> one cut without audio yet (module docstring: its fields)."""
    index: dict[tuple, int] = {}  # AudioRef.key -> clip number
    refs: list[AudioRef] = []
    written: set[int] = set()
    codes_index: dict[str, int] = {}
    for role, part in _all_parts(record):
        if isinstance(part, AudioRef):
            if part.key not in index:
                index[part.key] = len(refs)
                refs.append(part)
            if role == "assistant":
                written.add(index[part.key])
        elif isinstance(part, CodesRef) and str(part.path) not in codes_index:
            codes_index[str(part.path)] = len(codes_index)
    clips, sample, frame = [], 0, 0
    for k, ref in enumerate(refs):
        path, start, end = ref.key
        n = num_samples_loaded(ref.path, start, end)
        clip = {"path": path, "start": ref.start, "end": ref.end, "samples": [sample, sample + n], "frames": None}
        sample += n
        if k in written:
            f = num_codec_frames(n)
            clip["frames"] = [frame, frame + f]
            frame += f
        clips.append(clip)
    codes = []
    for path in codes_index:
        f = int(np.load(path, mmap_mode="r").shape[0])
        codes.append({"path": path, "frames": [frame, frame + f]})
        frame += f

    def parts(content: Iterable[ContentPart]) -> list[dict]:
        return [{"text": p.text} if isinstance(p, TextPart) else {"clip": index[p.key]} if isinstance(p, AudioRef)
                else {"codes": codes_index[str(p.path)]} for p in content]

    custom = {"task": "conversation" if isinstance(record, ConversationRecord) else "preference",
              "origin": record.id, "source": record.source, "clips": clips, "codes": codes,
              "turns": [{"role": t.role, "learn": t.learn, "parts": parts(t.parts)} for t in _record_turns(record)]}
    if isinstance(record, PreferenceRecord):
        custom.update(chosen=parts(record.chosen), rejected=parts(record.rejected), scores=record.scores)
    return MonoCut(id=cut_id, start=0.0, duration=sample / SAMPLE_RATE, channel=0, recording=None, custom=custom)


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


def cut_record(cut: Cut) -> PostTrainRecord:
    """The record a conversation / preference cut was made from (equal to what the manifest reader gave)."""
    c = cut.custom
    clips = [AudioRef(Path(x["path"]), x["start"], x["end"]) for x in c["clips"]]
    codes = [CodesRef(Path(x["path"])) for x in c["codes"]]

    def parts(content: list[dict]) -> tuple[ContentPart, ...]:
        return tuple(TextPart(str(p["text"])) if "text" in p else clips[p["clip"]] if "clip" in p
                     else codes[p["codes"]] for p in content)

    turns = tuple(ConversationTurn(str(t["role"]), parts(t["parts"]), bool(t["learn"])) for t in c["turns"])
    source = str(c.get("source", ""))
    if c["task"] == "conversation":
        return ConversationRecord(str(c["origin"]), turns, source)
    return PreferenceRecord(str(c["origin"]), turns, parts(c["chosen"]), parts(c["rejected"]), c.get("scores"),
                            source)


class CutClips:
    """A ``posttrain_dataset.ClipSource`` over a conversation / preference cut of the Shar stage: a heard clip is
    its span of the recording, a written clip or codes file its span of ``codec_tokens``. ``lengths_only``: the
    spans' lengths (AudioInLength / AudioOutLength), nothing loaded."""

    def __init__(self, cut: Cut, lengths_only: bool = False):
        self.cut, self.lengths_only = cut, lengths_only
        keys = [AudioRef(Path(x["path"]), x["start"], x["end"]).key for x in cut.custom["clips"]]
        self._samples = {k: x["samples"] for k, x in zip(keys, cut.custom["clips"])}
        self._frames = {k: x["frames"] for k, x in zip(keys, cut.custom["clips"])}
        self._code_frames = {str(Path(x["path"])): x["frames"] for x in cut.custom["codes"]}
        self._wav: torch.Tensor | None = None
        self._codes: torch.Tensor | None = None

    def _span(self, table: dict, key: Any, what: str) -> tuple[int, int]:
        span = table.get(key)
        if span is None:
            raise ValueError(f"cut {self.cut.id}: {what} {key} has no span in the cut")
        return int(span[0]), int(span[1])

    def heard(self, ref: AudioRef) -> AudioIn | AudioInLength:
        a, b = self._span(self._samples, ref.key, "clip")
        if self.lengths_only:
            return AudioInLength(b - a)
        if self._wav is None:
            self._wav = cut_waveform(self.cut)
        return AudioIn(self._wav[a:b].clone())

    def _out(self, a: int, b: int) -> AudioOut | AudioOutLength:
        if self.lengths_only:
            return AudioOutLength(b - a)
        if self._codes is None:
            self._codes = torch.from_numpy(self.cut.load_custom(CODEC_FIELD).astype(np.int64))  # [T, 8]
        return AudioOut(self._codes[a:b])

    def written(self, ref: AudioRef) -> AudioOut | AudioOutLength:
        return self._out(*self._span(self._frames, ref.key, "written clip"))

    def codes(self, ref: CodesRef) -> AudioOut | AudioOutLength:
        return self._out(*self._span(self._code_frames, str(ref.path), "codes file"))


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
