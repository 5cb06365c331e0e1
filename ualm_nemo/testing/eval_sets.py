"""Tiny benchmark files and wavs for the evaluation tests (a package module: any test folder can import it)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile


def write_mmau_set(tmp_path: Path, tone: Path) -> Path:
    """An MMAU-style json: 3 answerable items on ``tone``, one whose audio is missing (counted wrong) and one
    whose answer is not among its choices (rejected as malformed)."""
    entries = [{"id": f"q{i}", "audio_id": str(tone), "question": "What is it?", "choices": ["a tone", "a dog"],
                "answer": "a tone", "task": "sound", "difficulty": "easy", "category": "c", "sub-category": "s"}
               for i in range(3)]
    entries.append(entries[0] | {"id": "gone", "audio_id": str(tmp_path / "missing.wav")})
    entries.append(entries[0] | {"id": "bad", "answer": "a cat"})  # answer not among the choices: rejected
    path = tmp_path / "mmau.json"
    path.write_text(json.dumps(entries))
    return path


def write_clip(path: Path, seconds: float, rate: int = 16000, channels: int = 1, freq: float = 440.0,
               seed: int = 0) -> Path:
    """A noisy tone wav (mono, or stereo with a reversed second channel) at ``rate``: reproducible by ``seed``."""
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    wav = 0.3 * np.sin(2 * np.pi * freq * t) + 0.05 * rng.standard_normal(t.shape)
    data = np.stack([wav, 0.5 * wav[::-1]], axis=1) if channels == 2 else wav
    soundfile.write(path, data.astype(np.float32), rate)
    return path


def write_unusable_clips(folder: Path) -> dict[str, Path]:
    """Readable wav files the model cannot listen to: {"nan": 1 s with a NaN sample, "short": 10 ms (less than one
    encoder frame), "empty": 0 samples}, 16 kHz float wavs."""
    wav = (0.2 * np.sin(np.arange(16000) * 2 * np.pi * 440 / 16000)).astype(np.float32)
    wav[100] = np.nan
    clips = {"nan": wav, "short": wav[200:360], "empty": wav[:0]}
    paths = {name: folder / f"{name}.wav" for name in clips}
    for name, data in clips.items():
        soundfile.write(paths[name], data, 16000, subtype="FLOAT")
    return paths
