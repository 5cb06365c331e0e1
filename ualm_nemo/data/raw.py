"""Readers of the three raw formats (ETTA jsonl, Audio Flamingo 3 json, text jsonl) into small typed records.

Every entry is validated when read. A bad one (malformed JSON, missing or mistyped field, missing/unreadable
audio, sample-rate mismatch, empty audio or segment) becomes a ``Reject`` with its source (``file:line`` or
``file[index]``) and reason: a reader never raises on bad data and never drops an entry silently, so
``len(records) + len(rejects)`` is always the entry count.

Audio is only probed here (``soundfile.info``); ``load_audio`` reads the samples when a sample is built.
Relative audio paths are resolved against the manifest's folder.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from math import gcd
from pathlib import Path
from typing import Any, Generic, Iterator, TypeVar

import numpy as np
import soundfile as sf
import torch
from scipy.signal import resample_poly

from ualm_nemo.model.audio_frames import SAMPLE_RATE, num_encoder_frames

AUDIO_TAG = "<sound>"  # AF3's marker for where the clip goes in a human turn
_AF3_ROLES = {"human": "user", "gpt": "assistant"}
_TEXT_ROLES = ("system", "user", "assistant")

Turn = tuple[str, str]  # (role in {"system", "user", "assistant"}, text)


@dataclass(frozen=True)
class TTARecord:
    """Text-to-audio: generate the audio of ``audio_path[start:end]`` (seconds) from ``caption``."""

    audio_path: Path
    start: float
    end: float
    caption: str
    source: str = field(default="", compare=False)  # "file:line" it was read from, for naming it in later rejects


@dataclass(frozen=True)
class UnderstandingRecord:
    """Audio understanding: a dialogue about one clip; exactly one user turn holds AUDIO_TAG."""

    audio_path: Path
    turns: tuple[Turn, ...]
    id: str = ""
    source: str = field(default="", compare=False)


@dataclass(frozen=True)
class TextRecord:
    turns: tuple[Turn, ...]
    source: str = field(default="", compare=False)


Record = TTARecord | UnderstandingRecord | TextRecord
R = TypeVar("R")


@dataclass(frozen=True)
class Reject:
    source: str  # "manifest.jsonl:12" (1-based line) or "manifest.json[3]"
    reason: str


@dataclass
class ReadResult(Generic[R]):
    records: list[R] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)


class _Bad(ValueError):
    """Raised inside a reader for one entry; turned into a Reject."""


# --------------------------------------------------------------------------------------------- audio


def load_audio(path: str | Path, start: float = 0.0, end: float | None = None,
               target_sr: int = SAMPLE_RATE) -> torch.Tensor:
    """Float32 mono [samples] of ``path[start:end]`` (seconds), resampled to ``target_sr``."""
    with sf.SoundFile(str(path)) as f:
        sr = f.samplerate
        first = round(start * sr)
        last = f.frames if end is None else min(round(end * sr), f.frames)
        f.seek(first)
        data = f.read(max(last - first, 0), dtype="float32", always_2d=True)  # [samples, channels]
    wav = data.mean(axis=1)
    if sr != target_sr:
        g = gcd(sr, target_sr)
        wav = resample_poly(wav, target_sr // g, sr // g).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(wav))


def num_samples_loaded(path: str | Path, start: float = 0.0, end: float | None = None,
                       target_sr: int = SAMPLE_RATE) -> int:
    """``len(load_audio(path, start, end, target_sr))`` from the file header alone (no samples read)."""
    info = sf.info(str(path))
    sr = info.samplerate
    first = round(start * sr)
    n = max((info.frames if end is None else min(round(end * sr), info.frames)) - first, 0)
    if sr == target_sr:
        return n
    g = gcd(sr, target_sr)
    return -(-n * (target_sr // g) // (sr // g))  # resample_poly's output length: ceil(n * up / down)


def _probe_audio(path: Path, start: float = 0.0, end: float | None = None,
                 expected_sr: int | None = None) -> float:
    """Duration (s) of ``path``; raises _Bad unless it is a readable, non-empty clip that covers [start, end)."""
    if not path.is_file():
        raise _Bad(f"audio file not found: {path}")
    try:
        info = sf.info(str(path))
    except Exception as e:  # soundfile raises its own error type per backend failure
        raise _Bad(f"unreadable audio {path}: {e}") from None
    if expected_sr is not None and info.samplerate != expected_sr:
        raise _Bad(f"sample rate mismatch: manifest says {expected_sr}, {path} is {info.samplerate} Hz")
    if info.frames == 0:
        raise _Bad(f"empty audio: {path}")
    file_dur = info.frames / info.samplerate
    if end is not None and (start < 0 or end <= start):
        raise _Bad(f"empty or inverted segment [{start}, {end}) of {path}")
    if start >= file_dur or (end is not None and end > file_dur + 0.01):  # 10 ms slack for rounded manifests
        raise _Bad(f"segment [{start}, {end}) lies outside {path} ({file_dur:.3f} s)")
    _check_finite(path, info.samplerate, start, end)
    return file_dur


def _check_finite(path: Path, sr: int, start: float, end: float | None, block: int = 1 << 18) -> None:
    """Reject a segment holding NaN or infinite samples: they pass every later stage and then turn whole batches
    into skipped steps (or into all-zero codec tokens). Read block by block: memory stays small."""
    try:
        with sf.SoundFile(str(path)) as f:
            first = round(start * sr)
            left = (f.frames if end is None else min(round(end * sr), f.frames)) - first
            f.seek(first)
            while left > 0:
                data = f.read(min(block, left), dtype="float32", always_2d=True)
                if data.size == 0:
                    break
                if not np.isfinite(data).all():
                    raise _Bad(f"non-finite samples (NaN or inf) in {path}")
                left -= data.shape[0]
    except sf.LibsndfileError as e:
        raise _Bad(f"unreadable audio {path}: {e}") from None


def _resolve(root: Path, location: str) -> Path:
    p = Path(location)
    return p if p.is_absolute() else root / p


# --------------------------------------------------------------------------------------------- fields


def _field(entry: Any, key: str, kind: type | tuple[type, ...]) -> Any:
    if not isinstance(entry, dict):
        raise _Bad(f"entry is {type(entry).__name__}, expected a JSON object")
    if key not in entry:
        raise _Bad(f"missing field {key!r}")
    value = entry[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise _Bad(f"field {key!r} has type {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):  # json accepts NaN / Infinity
        raise _Bad(f"field {key!r} is {value}, not a finite number")
    return value


def _text(entry: Any, key: str) -> str:
    value = _field(entry, key, str)
    if not value.strip():
        raise _Bad(f"field {key!r} is empty")
    return value


def _jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """(source, parsed entry or _Bad) for each non-blank line; a line that is not UTF-8 is one reject."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield f"{path.name}:{lineno}", _Bad(f"not UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})")
                continue
            if not line.strip():
                continue
            try:
                yield f"{path.name}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{path.name}:{lineno}", _Bad(f"malformed JSON: {e.msg}")


def _collect(entries: Iterator[tuple[str, Any]], parse) -> ReadResult:
    result: ReadResult = ReadResult()
    for source, entry in entries:
        try:
            if isinstance(entry, _Bad):
                raise entry
            result.records.append(dataclasses.replace(parse(entry, source), source=source))
        except _Bad as e:
            result.rejects.append(Reject(source, str(e)))
    return result


# --------------------------------------------------------------------------------------------- readers


def read_tta_manifest(path: str | Path, check_audio: bool = True) -> ReadResult[TTARecord]:
    """ETTA-style jsonl: {"location","start_time","end_time","duration","caption","sample_rate"}."""
    path = Path(path)

    def parse(entry: Any, source: str) -> TTARecord:
        audio = _resolve(path.parent, _text(entry, "location"))
        start = float(_field(entry, "start_time", (int, float)))
        end = float(_field(entry, "end_time", (int, float)))
        if _field(entry, "duration", (int, float)) <= 0:
            raise _Bad(f"field 'duration' = {entry['duration']} is not positive")
        caption = _text(entry, "caption").strip()
        sr = _field(entry, "sample_rate", (int, float))
        if sr <= 0 or sr != int(sr):
            raise _Bad(f"field 'sample_rate' = {sr} is not a positive integer")
        sr = int(sr)
        if end <= start:
            raise _Bad(f"empty or inverted segment [{start}, {end})")
        if check_audio:
            _probe_audio(audio, start, end, expected_sr=sr)
        return TTARecord(audio, start, end, caption)

    return _collect(_jsonl(path), parse)


def _af3_turns(conversations: Any) -> tuple[Turn, ...]:
    if not isinstance(conversations, list) or not conversations:
        raise _Bad("field 'conversations' must be a non-empty list")
    turns = []
    for k, turn in enumerate(conversations):
        speaker = _field(turn, "from", str)
        if speaker not in _AF3_ROLES:
            raise _Bad(f"conversations[{k}].from = {speaker!r}, expected 'human' or 'gpt'")
        turns.append((_AF3_ROLES[speaker], _text(turn, "value")))
    if turns[0][0] != "user" or not any(role == "assistant" for role, _ in turns):
        raise _Bad("a conversation must start with 'human' and hold at least one 'gpt' turn")
    tags = sum(text.count(AUDIO_TAG) for _, text in turns)
    if tags > 1 or any(AUDIO_TAG in text for role, text in turns if role == "assistant"):
        raise _Bad(f"expected one {AUDIO_TAG} tag in a human turn, found {tags}")
    if tags == 0:  # the clip is implied: put it first, as AF3's own entries do
        turns[0] = ("user", f"{AUDIO_TAG}\n{turns[0][1]}")
    return tuple(turns)


def read_understanding_manifest(path: str | Path, check_audio: bool = True) -> ReadResult[UnderstandingRecord]:
    """Audio Flamingo 3 style json list: {"id","sound","duration","conversations":[{"from","value"}]}."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        return ReadResult(rejects=[Reject(path.name, f"malformed JSON: {e.msg} at line {e.lineno} (whole file)")])
    except UnicodeDecodeError as e:
        return ReadResult(rejects=[Reject(path.name, f"not UTF-8 at byte {e.start} (whole file)")])
    if not isinstance(data, list):
        return ReadResult(rejects=[Reject(path.name, "expected a JSON list of entries (whole file)")])

    seen: dict[str, str] = {}  # id -> where it was first read

    def parse(entry: Any, source: str) -> UnderstandingRecord:
        audio = _resolve(path.parent, _text(entry, "sound"))
        turns = _af3_turns(_field(entry, "conversations", list))
        entry_id = str(entry.get("id", ""))
        # optional (the length is read from the file), but a present one that is NaN, inf, negative or not a
        # number marks a damaged record, as it does in the TTA format
        if "duration" in entry and _field(entry, "duration", (int, float)) <= 0:
            raise _Bad(f"field 'duration' = {entry['duration']} is not positive")
        if entry_id and entry_id in seen:  # rule: the first entry with an id is kept, later ones rejected
            raise _Bad(f"duplicate id {entry_id!r} (first at {seen[entry_id]})")
        if check_audio:
            seconds = _probe_audio(audio)
            if num_encoder_frames(round(seconds * SAMPLE_RATE)) < 1:  # nothing for the placeholders to hold
                raise _Bad(f"audio too short for the audio encoder ({seconds * 1000:.0f} ms): {audio}")
        if entry_id:
            seen[entry_id] = source
        return UnderstandingRecord(audio, turns, entry_id)

    return _collect(((f"{path.name}[{i}]", e) for i, e in enumerate(data)), parse)


def read_text_manifest(path: str | Path) -> ReadResult[TextRecord]:
    """Text jsonl: {"input":[{"role","content"}], "output"}; the output is the final assistant turn."""
    path = Path(path)

    def parse(entry: Any, source: str) -> TextRecord:
        messages = _field(entry, "input", list)
        turns = []
        for k, message in enumerate(messages):
            role = _field(message, "role", str)
            if role not in _TEXT_ROLES:
                raise _Bad(f"input[{k}].role = {role!r}, expected one of {_TEXT_ROLES}")
            turns.append((role, _text(message, "content")))
        if not any(role == "user" for role, _ in turns):
            raise _Bad("input holds no user turn")
        return TextRecord((*turns, ("assistant", _text(entry, "output"))))

    return _collect(_jsonl(path), parse)
