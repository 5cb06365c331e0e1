"""Synthetic clips for enhancer tests: stereo audio with energy up to 20 kHz (what 16 kHz input cannot carry)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf


def wideband_stereo(seconds: float, sample_rate: int = 48000, seed: int = 0) -> np.ndarray:
    """[samples, 2]: a harmonic tone (220 Hz .. 19.8 kHz partials) plus noise, panned differently left and right."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    f0 = 220.0 * (1 + seed % 3)
    tone = sum(np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6.28)) / k ** 0.5
               for k in range(1, int(19800 // f0) + 1))
    tone = tone / np.abs(tone).max()
    noise = rng.standard_normal(t.shape) * 0.05
    left = 0.5 * tone + noise
    right = 0.3 * tone - noise * 0.5
    return np.stack([left, right], axis=1).astype(np.float32) * 0.8


def write_clips(folder: str | Path, count: int = 2, seconds: float = 1.0, sample_rate: int = 48000) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"clip{i}.wav"
        sf.write(path, wideband_stereo(seconds, sample_rate, seed=i), sample_rate)
        paths.append(path)
    return paths
