"""Audio preparation shared by the TTA metrics: read, pick channels, resample, peak-normalise, int16 round trip.

Every metric states which of these steps its reference protocol takes (its module docstring); the steps are
the same functions so that two metrics asking for "peak-normalised, 32 kHz mono" get identical samples.
Audio is numpy float32 ``[channels, samples]`` throughout. Reading uses soundfile (torchaudio 2.11 cannot load
files without TorchCodec); an unreadable, empty or non-finite file is an ``AudioError`` naming the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile


class AudioError(ValueError):
    """A clip that cannot be scored (unreadable, empty, non-finite); the message names the file."""


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """-> (float32 [channels, samples], sample rate)."""
    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, OSError, soundfile.LibsndfileError) as err:
        raise AudioError(f"{path}: cannot read audio ({err})") from None
    if data.shape[0] == 0:
        raise AudioError(f"{path}: no samples")
    if not np.isfinite(data).all():
        raise AudioError(f"{path}: NaN or infinite samples")
    return np.ascontiguousarray(data.T), int(rate)


def mono(wav: np.ndarray) -> np.ndarray:
    """[channels, samples] -> [1, samples], the channel mean (librosa's ``mono=True``)."""
    return wav.mean(axis=0, keepdims=True, dtype=np.float32)


def first_channel(wav: np.ndarray) -> np.ndarray:
    """[channels, samples] -> [1, samples], channel 0 (audioldm_eval)."""
    return wav[:1]


def stereo(wav: np.ndarray) -> np.ndarray:
    """[channels, samples] -> [2, samples]: mono copied to both channels, more than two keeps L and R."""
    return np.repeat(wav, 2, axis=0) if wav.shape[0] == 1 else wav[:2]


def librosa_length(samples: int, rate: int, target: int) -> int:
    """Samples librosa.resample (hence ``librosa.load(sr=target)``) returns: ``ceil(samples * (target / rate))``
    in float arithmetic, so 5 s at 44.1 kHz -> 48 kHz gives 240001 (soxr itself gives 240000)."""
    return int(np.ceil(samples * (float(target) / rate)))


def resample(wav: np.ndarray, rate: int, target: int, method: str = "soxr_hq") -> np.ndarray:
    """Resample along the last axis. ``soxr_hq``: ``soxr.resample`` (stable-audio-metrics' FD OpenL3);
    ``librosa``: what ``librosa.load(sr=target)`` returns (SAM's CLAP and PaSST): soxr HQ, then zero-padded or cut
    to ``librosa_length`` (laion_clap's repeat padding and PaSST's windows see that length);
    ``torchaudio``: ``torchaudio.functional.resample`` defaults (audioldm_eval, AES)."""
    if rate == target:
        return wav
    if method in ("soxr_hq", "librosa"):
        import soxr

        out = np.ascontiguousarray(soxr.resample(wav.T, rate, target, quality="HQ").T.astype(np.float32))
        return out if method == "soxr_hq" else fix_length(out, librosa_length(wav.shape[-1], rate, target))
    if method == "torchaudio":
        import torch
        import torchaudio

        return torchaudio.functional.resample(torch.from_numpy(wav), rate, target).numpy()
    raise ValueError(f"resample method {method!r}: 'soxr_hq', 'librosa' or 'torchaudio'")


def fix_length(wav: np.ndarray, samples: int) -> np.ndarray:
    """Zero-pad or cut the end to exactly ``samples`` (librosa.util.fix_length)."""
    return pad_to(wav, samples)[..., :samples]


def peak_normalise(wav: np.ndarray, dbfs: float = -1.0) -> np.ndarray:
    """Scale so the largest |sample| over all channels is ``dbfs`` (pyloudnorm.normalize.peak); silence is
    returned unchanged (pyloudnorm would divide by zero)."""
    peak = float(np.abs(wav).max())
    return wav if peak == 0.0 else (wav * (10.0 ** (dbfs / 20.0) / peak)).astype(np.float32)


def int16_round_trip(wav: np.ndarray) -> np.ndarray:
    """Clip to [-1, 1], quantise to int16 and back (x * 32767 truncated, / 32767): LAION-CLAP's input step."""
    return (np.clip(wav, -1.0, 1.0) * 32767.0).astype(np.int16).astype(np.float32) / 32767.0


def pad_to(wav: np.ndarray, samples: int) -> np.ndarray:
    """Zero-pad the end to at least ``samples``."""
    short = samples - wav.shape[-1]
    return np.pad(wav, ((0, 0), (0, short))) if short > 0 else wav
