"""Transcripts: every step a command or a reasoning mode produced, saved as json next to its audio files."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import soundfile

from ualm_nemo.inference.pipeline import Reply, ReplyAudio


@dataclass
class Step:
    """One turn: who spoke (user / assistant), what the step was for, its text and audio."""

    role: str
    name: str
    text: str = ""
    audio: list[ReplyAudio] = field(default_factory=list)
    audio_paths: list[str] = field(default_factory=list)  # inputs: the files the user gave
    stop: str | None = None

    @classmethod
    def from_reply(cls, name: str, reply: Reply) -> "Step":
        return cls("assistant", name, reply.text, reply.audio, stop=reply.stop)


@dataclass
class Transcript:
    mode: str
    steps: list[Step] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def add(self, step: Step) -> Step:
        self.steps.append(step)
        return step

    _written: set[Path] = field(default_factory=set, init=False, repr=False)  # wavs this object already saved

    def save(self, folder: str | Path, stem: str = "transcript") -> Path:
        """Write ``{stem}.json`` and one wav per generated clip (``{stem}_{step}_{k}.wav``) into ``folder``; the
        json is written last and atomically, so a json on disk always has its audio. Saving again after more
        steps (a session saved as it goes) writes only the new wavs."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        steps = []
        for i, step in enumerate(self.steps):
            entry: dict[str, Any] = {"role": step.role, "step": step.name, "text": step.text}
            if step.audio_paths:
                entry["audio_in"] = step.audio_paths
            if step.stop:
                entry["stop"] = step.stop
            clips = []
            for k, audio in enumerate(step.audio):
                clip: dict[str, Any] = {"frames": int(audio.codes.shape[0]), "seconds": audio.seconds}
                if audio.wav is not None:
                    name = f"{stem}_{i:02d}_{k}.wav"
                    if folder / name not in self._written:
                        _write_wav(folder / name, audio.wav, audio.sample_rate)
                        self._written.add(folder / name)
                    clip.update(file=name, sample_rate=audio.sample_rate)
                clips.append(clip)
            if clips:
                entry["audio"] = clips
            steps.append(entry)
        path = folder / f"{stem}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"mode": self.mode, **self.meta, "steps": steps}, indent=2, ensure_ascii=False))
        os.replace(tmp, path)
        return path


def _write_wav(path: Path, wav, sample_rate: int) -> None:
    """wav [channels, samples] under a temporary name, then renamed into place (never a half-written file)."""
    tmp = path.with_name(path.name + ".tmp")
    soundfile.write(tmp, wav.T.numpy(), sample_rate, format="WAV")
    os.replace(tmp, path)
