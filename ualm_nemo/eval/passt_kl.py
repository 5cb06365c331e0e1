"""KL PaSST: per-pair KL divergence of AudioSet class distributions (stable-audio-metrics' protocol).

Protocol (SAM ``passt_kld``):
* each file to mono (channel mean), resampled to 32 kHz as ``librosa.load(sr=32000)`` does (soxr HQ, then
  ceil(n * 32000 / rate) samples), peak-normalised to -1 dBFS;
* PaSST ``passt_s_swa_p16_128_ap476`` (hear21passt 0.0.26, 527 logits) on 10 s windows every 5 s: starts
  0, 5 s, ... below ``max(5 s, length - 5 s)``; a window shorter than 10 s is zero-padded to 10 s when it is
  longer than 1.5 s, else (a clip under 1.5 s) fed as it is, as SAM does;
* logits averaged over windows, then softmax -> one distribution per clip;
* per id, ``kl_div(log(p_ref + 1e-6), p_gen, sum)`` = KL(gen || ref) (``direction="ref||gen"``: audioldm_eval's
  other direction), averaged over pairs by the caller (divergences.paired_kl).
Weights: the PaSST release file (``passt-s-f128-p16-s10-ap.476-swa.pt``, the net's state dict), local only.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import torch

from ualm_nemo.eval import audio_prep
from ualm_nemo.eval.checkpoints import load_strict, load_weights, require_file

RATE = 32000
WINDOW = 10 * RATE
HOP = 5 * RATE
MIN_PADDED = int(0.15 * WINDOW)  # shorter windows are fed unpadded (SAM)
ARCH = "passt_s_swa_p16_128_ap476"


def build_model() -> torch.nn.Module:
    """Random-weight PaSST with its mel front end, returning logits (no download: ``pretrained=False``)."""
    from hear21passt.models.passt import get_model
    from hear21passt.models.preprocess import AugmentMelSTFT
    from hear21passt.wrapper import PasstBasicWrapper

    with contextlib.redirect_stdout(io.StringIO()):  # hear21passt prints banners
        mel = AugmentMelSTFT(n_mels=128, sr=RATE, win_length=800, hopsize=320, n_fft=1024, freqm=48, timem=192,
                             htk=False, fmin=0.0, fmax=None, norm=1, fmin_aug_range=10, fmax_aug_range=2000)
        net = get_model(arch=ARCH, pretrained=False, n_classes=527)
    return PasstBasicWrapper(mel=mel, net=net, mode="logits").eval()


def window_starts(samples: int) -> list[int]:
    """Start samples of the analysis windows of a clip of ``samples`` samples at 32 kHz."""
    return list(range(0, max(HOP, samples - HOP), HOP))


def windows(wav: np.ndarray) -> list[np.ndarray]:
    """Mono 32 kHz samples [samples] -> the windows PaSST sees (each 10 s, or shorter than 1.5 s)."""
    out = []
    for start in window_starts(wav.shape[-1]):
        window = wav[start:start + WINDOW]
        if window.shape[-1] < WINDOW and window.shape[-1] > MIN_PADDED:
            window = np.pad(window, (0, WINDOW - window.shape[-1]))
        out.append(window)
    return out


@contextlib.contextmanager
def _stft_returning_real():
    """hear21passt calls ``torch.stft(..., return_complex=False)``-style code; keep it working (as SAM does)."""
    original = torch.stft
    torch.stft = partial(original, return_complex=False)
    try:
        yield
    finally:
        torch.stft = original


class PasstClassifier:
    """Class distributions of clips, protocol above."""

    name = "kl_passt"

    def __init__(self, model: torch.nn.Module, device: str = "cpu"):
        self.model, self.device = model.to(device).eval(), device

    @classmethod
    def load(cls, path: str | Path | None, **kwargs) -> PasstClassifier:
        path = require_file(path, "--passt")
        model = build_model()
        state = load_weights(path, "--passt")
        if not any(k.startswith("net.") for k in state):  # the release file holds the net alone
            state = {f"net.{k}": v for k, v in state.items()}
        load_strict(model, {**state, "device_proxy": model.device_proxy}, path, "--passt")
        return cls(model, **kwargs)

    @staticmethod
    def prepare(wav: np.ndarray, rate: int) -> np.ndarray:
        """File samples -> mono 32 kHz peak-normalised [samples]."""
        return audio_prep.peak_normalise(audio_prep.resample(audio_prep.mono(wav), rate, RATE, "librosa"))[0]

    @torch.no_grad()
    def logits(self, wav: np.ndarray, rate: int) -> np.ndarray:
        """File samples -> per-window logits [windows, 527]."""
        rows = []
        with _stft_returning_real(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the library's deprecation and short-input warnings
            for window in windows(self.prepare(wav, rate)):
                rows.append(self.model(torch.from_numpy(window.astype(np.float32))[None].to(self.device)).cpu())
        return torch.cat(rows).double().numpy()

    def probabilities(self, wav: np.ndarray, rate: int) -> np.ndarray:
        """File samples -> softmax of the window-averaged logits [527]."""
        return distribution(self.logits(wav, rate))


def distribution(logits: np.ndarray) -> np.ndarray:
    """Per-window logits [windows, 527] -> the clip's class distribution: mean over windows, then softmax."""
    return torch.softmax(torch.from_numpy(np.asarray(logits, dtype=np.float64).mean(axis=0)), dim=0).numpy()
