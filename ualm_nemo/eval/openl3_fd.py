"""FD OpenL3: Fréchet distance between OpenL3 frame embeddings of two sets (stable-audio-metrics' protocol).

Protocol (SAM ``openl3_fd``, via torchopenl3 1.0.1 instead of TF openl3):
* each file peak-normalised to -1 dBFS (pyloudnorm), resampled (soxr HQ) to the evaluation rate, 44.1 kHz;
* OpenL3 ``mel256``, 512-d, content type ``env`` (sound) or ``music``; the library resamples to its 48 kHz
  (resampy kaiser_best, as TF openl3 does), centres (half a window of zeros in front), cuts 1 s windows every
  0.5 s and zero-pads the tail; a clip under 1 s is one zero-padded window;
* ``channels=2`` (default): L and R embedded separately and concatenated per frame (1024-d), a mono file copied
  to both; ``channels=1``: the channel mean, 512-d;
* the frames of all files are pooled; mean and (unbiased) covariance over frames; FD by frechet.py.
Weights: the torchopenl3 file (``torchopenl3_mel256_{env,music}_512.pth.tar``, a state dict), local only.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ualm_nemo.eval import audio_prep
from ualm_nemo.eval.checkpoints import load_strict, load_weights, require_file
from ualm_nemo.eval.frechet import GaussianStats, frechet_distance

EVAL_RATE = 44100
MODEL_RATE = 48000
HOP_SECONDS = 0.5


def build_model(content_type: str = "env"):
    """Random-weight OpenL3 (mel256, 512-d) of ``content_type``."""
    from torchopenl3.models import PytorchOpenl3

    if content_type not in ("env", "music"):
        raise ValueError(f"OpenL3 content type {content_type!r}: 'env' or 'music'")
    return PytorchOpenl3(input_repr="mel256", embedding_size=512, content_type=content_type).eval()


class OpenL3Embedder:
    """OpenL3 frame embeddings of clips, protocol above."""

    name = "fd_openl3"

    def __init__(self, model: torch.nn.Module, channels: int = 2, device: str = "cpu", batch_size: int = 32):
        if channels not in (1, 2):
            raise ValueError(f"channels={channels}: 1 (mono) or 2 (L and R concatenated)")
        self.model, self.channels, self.device, self.batch_size = model.to(device), channels, device, batch_size

    @classmethod
    def load(cls, path: str | Path | None, content_type: str = "env", **kwargs) -> OpenL3Embedder:
        path = require_file(path, "--openl3")
        model = build_model(content_type)
        load_strict(model, load_weights(path, "--openl3", key="state_dict"), path, "--openl3")
        return cls(model, **kwargs)

    def prepare(self, wav: np.ndarray, rate: int) -> np.ndarray:
        """File samples -> [channels, samples] at 44.1 kHz, peak-normalised, as the protocol feeds OpenL3."""
        wav = audio_prep.peak_normalise(wav)
        wav = audio_prep.stereo(wav) if self.channels == 2 else audio_prep.mono(wav)
        return audio_prep.resample(wav, rate, EVAL_RATE, "soxr_hq")

    @staticmethod
    def windows(channel: np.ndarray, rate: int = EVAL_RATE) -> torch.Tensor:
        """One channel [samples] -> its 1 s windows at 48 kHz [frames, 1, 48000] (torchopenl3's framing)."""
        from torchopenl3.utils import preprocess_audio_batch

        audio = torch.from_numpy(np.asarray(channel, dtype=np.float64))[None]
        logging.disable(logging.WARNING)  # torchopenl3 warns on the root logger at every resampy call
        try:
            return preprocess_audio_batch(audio, rate, center=True, hop_size=HOP_SECONDS, sampler="resampy").float()
        finally:
            logging.disable(logging.NOTSET)

    @torch.no_grad()
    def embed(self, wav: np.ndarray, rate: int) -> np.ndarray:
        """File samples -> frame embeddings [frames, 512 * channels]."""
        per_channel = []
        for channel in self.prepare(wav, rate):
            frames = self.windows(channel)
            out = [self.model(frames[i:i + self.batch_size].to(self.device)).cpu()
                   for i in range(0, frames.shape[0], self.batch_size)]
            per_channel.append(torch.cat(out).reshape(frames.shape[0], -1).double().numpy())
        return np.concatenate(per_channel, axis=1)


def fd_from_frames(generated: list[np.ndarray], reference: list[np.ndarray]) -> float:
    """FD between the pooled frames of two sets of clips (each clip [frames, d])."""
    return frechet_distance(GaussianStats.of(np.concatenate(generated)), GaussianStats.of(np.concatenate(reference)))
