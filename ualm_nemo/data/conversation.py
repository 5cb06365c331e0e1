r"""Post-training records: conversations with several audio segments (SFT) and preference pairs (DPO).

Both manifests are JSONL, one record per line; relative audio and codes paths resolve against the manifest's
folder. Other top-level keys of a record are ignored (metadata).

Conversation (SFT), ``read_conversation_manifest``::

    {"id": "dog-001",
     "turns": [
       {"role": "system", "content": "You are UALM."},
       {"role": "user", "content": "A dog barks in a big hall."},
       {"role": "assistant", "content": [
           {"rich_caption": {"keywords": ["dog", "bark"], "layout": "0-2 s two barks",
                             "description": "A dog barks twice."}},
           {"audio": "clips/dog.wav"}]},
       {"role": "user", "content": [{"audio": "clips/dog.wav", "start": 0.0, "end": 2.0},
                                    {"text": "Describe what you made."}]},
       {"role": "assistant", "content": "Two barks.", "learn": false}]}

* ``id``: a non-empty string, unique in the manifest. A later record with an id already read is rejected and
  the first one kept (an id is taken only by a record that was accepted).
* a turn: ``role`` (system | user | assistant), ``content``, optional ``learn`` (bool; assistant turns only,
  default true). Assistant turns are learned (text, audio and their ``<|im_end|>``) unless ``"learn": false``;
  system and user turns never are. A conversation needs at least one learned assistant turn.
* ``content``: a non-empty string (one text part) or a non-empty list of parts, each one of
    ``{"text": str}`` (non-empty; whitespace alone is a part too: ``"\n"`` between a heard clip and the text is
        what inference writes, tokenized on its own)
    ``{"rich_caption": {"keywords": [str], "layout": str, "description": str}}`` -> the text
        ``RichCaption.render()`` writes (data/rich_caption.py, the one formatter of rich captions)
    ``{"audio": path, "start"?: seconds, "end"?: seconds}`` -> a clip (or its segment). In a system / user turn
        it is HEARD (16 kHz mono log-mel into the audio encoder); in an assistant turn it is WRITTEN (its codec
        tokens are the targets over the delay pattern; the wav is codec-encoded once when the dataset is built)
    ``{"codes": path.npy}`` -> written audio given as integer codec codes [F, 8] in [0, 1024) (e.g. what the
        model sampled), used as they are; assistant turns only
  The same clip may be written in one turn and heard in a later one (self-reflection). Two heard clips in one
  turn need a text part between them (their ``<|audio_in|>`` runs would otherwise merge into one).

Preference pair (DPO), ``read_preference_manifest``::

    {"id": "pair-17", "prompt": [turns as above, ending with a user turn],
     "chosen": <assistant content>, "rejected": <assistant content>,
     "scores": {"chosen": {...}, "rejected": {...}}}

``chosen`` / ``rejected`` are assistant-turn contents (string or parts) and must differ; prompt turns are never
learned (``"learn": true`` in a prompt is rejected); ``scores`` (optional, any JSON) is kept, not used.

Every bad entry becomes a ``raw.Reject`` with its ``file:line`` and reason (the machinery of data/raw.py); a
reader never raises on bad data, so ``len(records) + len(rejects)`` is the count of non-blank lines. With
``check_audio`` (default) every audio file is probed (found, readable, non-empty, finite samples, the segment
inside the file, long enough for the audio encoder when heard) and every codes file loaded and checked (shape
[F >= 1, 8], integer, in [0, 1024)); ``check_audio=False`` skips the file checks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np

from ualm_nemo.data.raw import (ReadResult, _Bad, _collect, _field, _jsonl, _probe_audio, _resolve,
                                num_samples_loaded)
from ualm_nemo.data.rich_caption import RichCaption
from ualm_nemo.model.audio_frames import num_encoder_frames

ROLES = ("system", "user", "assistant")
NUM_CODEBOOKS = 8
CODEBOOK_SIZE = 1024
_TURN_KEYS = {"role", "content", "learn"}
_PART_KEYS = {"text": {"text"}, "rich_caption": {"rich_caption"}, "audio": {"audio", "start", "end"},
              "codes": {"codes"}}
_CAPTION_KEYS = {"keywords", "layout", "description"}


@dataclass(frozen=True)
class TextPart:
    text: str


@dataclass(frozen=True)
class AudioRef:
    """A clip ``path[start:end]`` (seconds; None: the file's start / end)."""

    path: Path
    start: float | None = None
    end: float | None = None

    @property
    def key(self) -> tuple[str, float, float | None]:
        """(path, start, end) with the defaults filled in: one clip, however it is referenced."""
        return str(self.path), 0.0 if self.start is None else self.start, self.end


@dataclass(frozen=True)
class CodesRef:
    """Written audio as codec codes: an ``.npy`` of int [F, 8]."""

    path: Path


ContentPart = Union[TextPart, AudioRef, CodesRef]


@dataclass(frozen=True)
class ConversationTurn:
    role: str
    parts: tuple[ContentPart, ...]
    learn: bool = False


@dataclass(frozen=True)
class ConversationRecord:
    id: str
    turns: tuple[ConversationTurn, ...]
    source: str = field(default="", compare=False)


@dataclass(frozen=True)
class PreferenceRecord:
    id: str
    prompt: tuple[ConversationTurn, ...]
    chosen: tuple[ContentPart, ...]
    rejected: tuple[ContentPart, ...]
    scores: Any = field(default=None, compare=False)
    source: str = field(default="", compare=False)


# --------------------------------------------------------------------------------------------- parts


def _seconds(part: dict, key: str, where: str) -> float | None:
    if key not in part:
        return None
    value = part[key]
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise _Bad(f"{where}.{key} has type {type(value).__name__}, expected seconds")
    if not math.isfinite(value):
        raise _Bad(f"{where}.{key} is {value}, not a finite number")
    return float(value)


def _rich_caption(value: Any, where: str) -> str:
    if not isinstance(value, dict):
        raise _Bad(f"{where}.rich_caption must be an object with keywords, layout, description")
    unknown = set(value) - _CAPTION_KEYS
    if unknown:
        raise _Bad(f"{where}.rich_caption has unknown key {sorted(unknown)[0]!r} (keywords, layout, description)")
    keywords = value.get("keywords", [])
    if not isinstance(keywords, list) or not all(isinstance(k, str) and k.strip() for k in keywords):
        raise _Bad(f"{where}.rich_caption.keywords must be a list of non-empty strings")
    layout, description = value.get("layout", ""), value.get("description", "")
    if not isinstance(layout, str) or not isinstance(description, str):
        raise _Bad(f"{where}.rich_caption.layout and .description must be strings")
    if not (keywords or layout.strip() or description.strip()):
        raise _Bad(f"{where}.rich_caption is empty")
    return RichCaption(tuple(k.strip() for k in keywords), layout, description).render()


def _part(value: Any, root: Path, where: str) -> ContentPart:
    if not isinstance(value, dict):
        raise _Bad(f"{where} is {type(value).__name__}, expected an object (text, rich_caption, audio or codes)")
    kinds = [k for k in _PART_KEYS if k in value]
    if len(kinds) != 1:
        raise _Bad(f"{where} must hold exactly one of text, rich_caption, audio, codes; has {sorted(value)}")
    kind = kinds[0]
    unknown = set(value) - _PART_KEYS[kind]
    if unknown:
        raise _Bad(f"{where} has unknown key {sorted(unknown)[0]!r} for a {kind} part")
    if kind == "text":
        text = value["text"]
        if not isinstance(text, str) or not text:  # whitespace is kept: "\n" after a heard clip is what inference writes
            raise _Bad(f"{where}.text must be a non-empty string")
        return TextPart(text)
    if kind == "rich_caption":
        return TextPart(_rich_caption(value["rich_caption"], where))
    location = value[kind]
    if not isinstance(location, str) or not location.strip():
        raise _Bad(f"{where}.{kind} must be a non-empty path")
    if kind == "codes":
        return CodesRef(_resolve(root, location))
    start, end = _seconds(value, "start", where), _seconds(value, "end", where)
    if start is not None and start < 0:
        raise _Bad(f"{where}.start = {start} is negative")
    if end is not None and end <= (start or 0.0):
        raise _Bad(f"{where}: empty or inverted segment [{start or 0.0}, {end})")
    return AudioRef(_resolve(root, location), start, end)


def _content(value: Any, root: Path, where: str) -> tuple[ContentPart, ...]:
    if isinstance(value, str):
        if not value.strip():
            raise _Bad(f"{where} is empty")
        return (TextPart(value),)
    if not isinstance(value, list):
        raise _Bad(f"{where} has type {type(value).__name__}, expected a string or a list of parts")
    if not value:
        raise _Bad(f"{where} is empty")
    return tuple(_part(p, root, f"{where}[{k}]") for k, p in enumerate(value))


def _turns(value: Any, root: Path, where: str, learnable: bool) -> tuple[ConversationTurn, ...]:
    if not isinstance(value, list) or not value:
        raise _Bad(f"field {where!r} must be a non-empty list of turns")
    turns = []
    for k, turn in enumerate(value):
        here = f"{where}[{k}]"
        if not isinstance(turn, dict):
            raise _Bad(f"{here} is {type(turn).__name__}, expected an object")
        unknown = set(turn) - _TURN_KEYS
        if unknown:
            raise _Bad(f"{here} has unknown key {sorted(unknown)[0]!r} (role, content, learn)")
        role = _field(turn, "role", str)
        if role not in ROLES:
            raise _Bad(f"{here}.role = {role!r}, expected one of {ROLES}")
        if "content" not in turn:
            raise _Bad(f"{here} has no content")
        learn = turn.get("learn", role == "assistant" and learnable)
        if not isinstance(learn, bool):
            raise _Bad(f"{here}.learn must be true or false")
        if learn and role != "assistant":
            raise _Bad(f"{here}: a {role} turn is never learned (learn is for assistant turns)")
        if learn and not learnable:
            raise _Bad(f"{here}: prompt turns are never learned (the pair's chosen / rejected are)")
        turns.append(ConversationTurn(role, _assistant_or(role, _content(turn["content"], root, f"{here}.content"),
                                                          f"{here}.content"), learn))
    return tuple(turns)


def _assistant_or(role: str, parts: tuple[ContentPart, ...], where: str) -> tuple[ContentPart, ...]:
    """Codes are written audio: only an assistant turn holds them. Two heard clips need text between them: the
    trainer tells clips apart by their runs of ``<|audio_in|>`` (data/microbatch.clips_per_row)."""
    if role != "assistant":
        for k, part in enumerate(parts):
            if isinstance(part, CodesRef):
                raise _Bad(f"{where}[{k}]: codes in a {role} turn (codes are written audio: assistant turns only)")
            if k and isinstance(part, AudioRef) and isinstance(parts[k - 1], AudioRef):
                raise _Bad(f"{where}[{k}]: a heard clip right after another; put a text part between them (their "
                           "placeholder runs would merge into one)")
    return parts


# --------------------------------------------------------------------------------------------- files


class _FileChecks:
    """Probes each audio clip and codes file once per read (a clip referenced twice is probed once)."""

    def __init__(self) -> None:
        self._seen: dict[tuple, str | None] = {}  # key -> None (good) or the reason it is bad

    def _once(self, key: tuple, check) -> None:
        if key not in self._seen:
            try:
                check()
                self._seen[key] = None
            except _Bad as e:
                self._seen[key] = str(e)
        if self._seen[key] is not None:
            raise _Bad(self._seen[key])

    def audio(self, ref: AudioRef, heard: bool) -> None:
        path, start, end = ref.key

        def check() -> None:
            _probe_audio(ref.path, start, end)

        self._once(("audio", path, start, end), check)
        if heard:
            def long_enough() -> None:
                n = num_samples_loaded(ref.path, start, end)
                if num_encoder_frames(n) < 1:
                    raise _Bad(f"audio too short for the audio encoder ({n / 16:.0f} ms): {ref.path}")

            self._once(("heard", path, start, end), long_enough)

    def codes(self, ref: CodesRef) -> None:
        self._once(("codes", str(ref.path)), lambda: load_codes_file(ref.path))

    def turn(self, role: str, parts: tuple[ContentPart, ...], where: str) -> None:
        for k, part in enumerate(parts):
            try:
                if isinstance(part, AudioRef):
                    self.audio(part, heard=role != "assistant")
                elif isinstance(part, CodesRef):
                    self.codes(part)
            except _Bad as e:
                raise _Bad(f"{where}[{k}]: {e}") from None


def load_codes_file(path: Path) -> np.ndarray:
    """The int64 codes [F, 8] of an ``.npy``; raises _Bad (a ValueError) naming what is wrong with it."""
    if not path.is_file():
        raise _Bad(f"codes file not found: {path}")
    try:
        with open(path, "rb") as f:
            if f.read(6) != b"\x93NUMPY":
                raise _Bad(f"unreadable codes file {path}: not a .npy file")
        codes = np.load(path, allow_pickle=False)
    except _Bad:
        raise
    except Exception as e:  # numpy raises ValueError / OSError / EOFError for broken files
        raise _Bad(f"unreadable codes file {path}: {e}") from None
    if codes.ndim != 2 or codes.shape[1] != NUM_CODEBOOKS or codes.shape[0] < 1:
        raise _Bad(f"codes file {path} holds shape {tuple(codes.shape)}, expected [F >= 1, {NUM_CODEBOOKS}]")
    if codes.dtype.kind not in "iu":
        raise _Bad(f"codes file {path} holds {codes.dtype}, expected integer codes")
    if int(codes.min()) < 0 or int(codes.max()) >= CODEBOOK_SIZE:
        raise _Bad(f"codes file {path} holds codes in [{int(codes.min())}, {int(codes.max())}], "
                   f"outside [0, {CODEBOOK_SIZE})")
    return codes.astype(np.int64)


def _same(parts: tuple[ContentPart, ...]) -> tuple:
    """What a content is, for comparing two of them (a clip by its key: no start means start 0)."""
    return tuple(p.key if isinstance(p, AudioRef) else p for p in parts)


def _record_id(entry: Any, seen: dict[str, str]) -> str:
    entry_id = _field(entry, "id", str)
    if not entry_id.strip():
        raise _Bad("field 'id' is empty")
    if entry_id in seen:  # rule: the first record with an id is kept, later ones rejected
        raise _Bad(f"duplicate id {entry_id!r} (first at {seen[entry_id]})")
    return entry_id


# --------------------------------------------------------------------------------------------- readers


def read_conversation_manifest(path: str | Path, check_audio: bool = True) -> ReadResult[ConversationRecord]:
    """Conversation JSONL (module docstring) -> records and a Reject (``file:line``, reason) per bad line."""
    path = Path(path)
    seen: dict[str, str] = {}
    files = _FileChecks()

    def parse(entry: Any, source: str) -> ConversationRecord:
        if not isinstance(entry, dict):
            raise _Bad(f"entry is {type(entry).__name__}, expected a JSON object")
        entry_id = _record_id(entry, seen)
        turns = _turns(entry.get("turns"), path.parent, "turns", learnable=True)
        if not any(t.learn for t in turns):
            raise _Bad("no learned assistant turn: nothing to learn")
        if check_audio:
            for k, turn in enumerate(turns):
                files.turn(turn.role, turn.parts, f"turns[{k}].content")
        seen[entry_id] = source
        return ConversationRecord(entry_id, turns)

    return _collect(_jsonl(path), parse)


def read_preference_manifest(path: str | Path, check_audio: bool = True) -> ReadResult[PreferenceRecord]:
    """Preference-pair JSONL (module docstring) -> records and a Reject (``file:line``, reason) per bad line."""
    path = Path(path)
    seen: dict[str, str] = {}
    files = _FileChecks()

    def parse(entry: Any, source: str) -> PreferenceRecord:
        if not isinstance(entry, dict):
            raise _Bad(f"entry is {type(entry).__name__}, expected a JSON object")
        entry_id = _record_id(entry, seen)
        prompt = _turns(entry.get("prompt"), path.parent, "prompt", learnable=False)
        if prompt[-1].role != "user":
            raise _Bad(f"the prompt's last turn is a {prompt[-1].role} turn, expected a user turn")
        sides = []
        for side in ("chosen", "rejected"):
            if side not in entry:
                raise _Bad(f"missing field {side!r}")
            sides.append(_content(entry[side], path.parent, side))
        if _same(sides[0]) == _same(sides[1]):
            raise _Bad("chosen and rejected are identical: nothing to prefer")
        if check_audio:
            for k, turn in enumerate(prompt):
                files.turn(turn.role, turn.parts, f"prompt[{k}].content")
            for side, parts in zip(("chosen", "rejected"), sides):
                files.turn("assistant", parts, side)
        seen[entry_id] = source
        return PreferenceRecord(entry_id, prompt, sides[0], sides[1], entry.get("scores"))

    return _collect(_jsonl(path), parse)
