"""Self-reflection SFT data (UALM-Reason, round 2) from the transcripts of ``inference.reasoning.self_reflect``.

A transcript is plan -> audio -> listen (the model hears its clip) -> rich caption of the result -> critique ->
refined audio, made by the DPO-1 model. Each becomes one conversation record (data/conversation.py) holding
exactly the turns the model saw, in the order it saw them, so SFT-2 trains on the rows inference builds:

* user turns: the reasoning templates' text; the listening turn hears the clip the model wrote, at the codec's
  rate (``clips/<id>_<turn>_<k>.wav``: the same waveform ``self_reflect`` fed back), then ``"\\n"`` and the text;
* assistant turns: their text, and written audio as the codes the model sampled (``codes/<id>_<turn>_<k>.npy``,
  used verbatim: no re-encoding);
* the first, unrefined audio is not learned by default (``learn_first_audio``): SFT-2 learns to plan, to
  describe what it hears, to critique and to refine, not to repeat the flawed clip.

The assistant text is the transcript's unless ``texts`` replaces it per step name (``{"listen": ..., "critique":
...}``): in production the caption of the result and the critique usually come from a stronger captioner / judge
(the paper's recipe), and a model's undecodable bytes (U+FFFD) are no training text. A transcript with an empty
turn, or with U+FFFD in a text it keeps, gives no record and is counted, with its reason.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import soundfile

from ualm_nemo.inference.transcript import Transcript

CODEC_RATE = 16000  # X-Codec's waveform rate: what the model hears back
FIRST_AUDIO_STEP = "audio"  # the name reasoning.self_reflect gives the unrefined clip's turn


@dataclass
class ReflectionManifest:
    path: Path
    written: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (record id, reason)


def reflection_record(transcript: Transcript, record_id: str, folder: str | Path, learn_first_audio: bool = False,
                      texts: Mapping[str, str] | None = None) -> dict[str, Any]:
    """One transcript -> a conversation record (its clips and codes written under ``folder``); ValueError when a
    turn is empty or holds undecodable text."""
    folder = Path(folder)
    texts = dict(texts or {})
    turns = []
    for i, step in enumerate(transcript.steps):
        parts: list[dict[str, Any]] = []
        if step.role == "user":
            for k, audio in enumerate(step.audio):
                if audio.codec_wav is None:
                    raise ValueError(f"turn {i} ({step.name}) heard a clip that was not decoded")
                name = f"clips/{record_id}_{i:02d}_{k}.wav"
                # 32-bit float: the waveform the model heard, not a 16-bit rounding of it
                soundfile.write(folder / name, audio.codec_wav.float().numpy(), CODEC_RATE, subtype="FLOAT")
                parts.append({"audio": name})
            if step.audio:
                parts.append({"text": "\n"})  # reasoning._step puts a newline between the clip and the text
            if step.text:
                parts.append({"text": step.text})
        else:
            text = texts.get(step.name, step.text)
            if "\ufffd" in text:
                raise ValueError(f"turn {i} ({step.name}) holds undecodable text (U+FFFD): replace it (texts=)")
            if text.strip():
                parts.append({"text": text})
            for k, audio in enumerate(step.audio):
                name = f"codes/{record_id}_{i:02d}_{k}.npy"
                np.save(folder / name, audio.codes.numpy().astype(np.int16))
                parts.append({"codes": name})
        if not parts:
            raise ValueError(f"turn {i} ({step.role}, {step.name}) is empty")
        turn: dict[str, Any] = {"role": step.role, "content": parts}
        if step.role == "assistant" and step.name == FIRST_AUDIO_STEP and not learn_first_audio:
            turn["learn"] = False
        turns.append(turn)
    return {"id": record_id, "turns": turns, "source": {"mode": transcript.mode, **transcript.meta}}


class ReflectionFolder:
    """``folder/reflection.jsonl`` (+ clips/, codes/) and ``skipped.jsonl``, appended batch by batch: a killed run
    resumes at the first prompt id in neither file (a torn last line is dropped: its prompt is redone)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path, self.skipped_path = self.folder / "reflection.jsonl", self.folder / "skipped.jsonl"
        for sub in ("clips", "codes"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        self.done: set[str] = {r["id"] for path in (self.path, self.skipped_path) for r in self.read(path)}

    @staticmethod
    def read(path: Path) -> list[dict[str, Any]]:
        """The lines of reflection.jsonl / skipped.jsonl (none when absent)."""
        if not path.is_file():
            return []
        lines, kept = path.read_text().splitlines(), []
        for k, line in enumerate(lines):
            try:
                kept.append(json.loads(line))
            except json.JSONDecodeError:
                if k != len(lines) - 1:
                    raise ValueError(f"{path}:{k + 1}: not JSON (only a torn last line is repaired)") from None
                path.write_text("".join(json.dumps(r) + "\n" for r in kept))  # the kill tore it: redo that prompt
        return kept

    def add(self, transcripts: Sequence[Transcript], ids: Sequence[str], learn_first_audio: bool = False,
            texts: Sequence[Mapping[str, str]] | None = None) -> ReflectionManifest:
        """Write the records of one batch (flushed to disk before returning); -> this batch's counts."""
        if len(ids) != len(transcripts) or len(set(ids)) != len(ids) or self.done & set(ids):
            raise ValueError(f"{len(ids)} ids for {len(transcripts)} transcripts: one new, unique id each")
        result = ReflectionManifest(self.path)
        lines, skipped = [], []
        for k, (transcript, record_id) in enumerate(zip(transcripts, ids)):
            try:
                record = reflection_record(transcript, record_id, self.folder, learn_first_audio,
                                           texts[k] if texts else None)
                lines.append(json.dumps(record))
            except ValueError as err:
                result.skipped.append((record_id, str(err)))
                skipped.append(json.dumps({"id": record_id, "reason": str(err)}))
        for path, new in ((self.path, lines), (self.skipped_path, skipped)):
            with open(path, "a") as f:
                f.write("".join(line + "\n" for line in new))
                f.flush()
                os.fsync(f.fileno())
        self.done |= set(ids)
        result.written = len(lines)
        return result


def write_reflection_manifest(transcripts: Sequence[Transcript], ids: Sequence[str], folder: str | Path,
                              learn_first_audio: bool = False, texts: Sequence[Mapping[str, str]] | None = None
                              ) -> ReflectionManifest:
    """All transcripts at once into ``folder`` (see ReflectionFolder)."""
    return ReflectionFolder(folder).add(transcripts, ids, learn_first_audio, texts)
