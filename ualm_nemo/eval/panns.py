"""PANNs CNN14 (16 kHz) for the Inception Score and FD-PANNs (audioldm_eval's protocol).

Our own module (panns_inference downloads at import), laid out so that the public checkpoint
``Cnn14_16k_mAP=0.438.pth`` loads strictly: ``spectrogram_extractor`` / ``logmel_extractor`` are torchlibrosa's
``Spectrogram`` / ``LogmelFilterBank`` (their STFT kernels and mel matrix are stored in the checkpoint and loaded
as they are), then ``bn0``, ``conv_block1..6`` (two 3x3 conv + BN + ReLU, 2x2 average pooling, the last 1x1),
``fc1`` and ``fc_audioset``.

Protocol (audioldm_eval): first channel, DC removed (mean subtracted), resampled with torchaudio's default
sinc to 16 kHz, zero-padded to at least 2 s, the whole clip in one pass (no windows, no normalisation); front end
window 512, hop 160, 64 mel bins 50-8000 Hz, log power (ref 1, amin 1e-10). Outputs: ``logits`` (fc_audioset,
527 AudioSet classes; IS takes their softmax, 10 splits shuffled with RandomState(2020): divergences.py) and
the 2048-d ``embedding`` (ReLU(fc1)), one per clip, for FD-PANNs (mean / covariance over clips).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ualm_nemo.eval import audio_prep
from ualm_nemo.eval.checkpoints import load_strict, load_weights, require_file

RATE = 16000
MIN_SAMPLES = 2 * RATE
CLASSES = 527


class ConvBlock(nn.Module):
    def __init__(self, channels_in: int, channels_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, padding=1, bias=False)
        self.bn1, self.bn2 = nn.BatchNorm2d(channels_out), nn.BatchNorm2d(channels_out)

    def forward(self, x: torch.Tensor, pool: int) -> torch.Tensor:
        x = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return F.avg_pool2d(x, pool) if pool > 1 else x


class Cnn14(nn.Module):
    """CNN14 at 16 kHz (inference only: no SpecAugment, no dropout, no mixup)."""

    def __init__(self, window: int = 512, hop: int = 160, mel_bins: int = 64, fmin: float = 50.0,
                 fmax: float = 8000.0, classes: int = CLASSES):
        super().__init__()
        from torchlibrosa.stft import LogmelFilterBank, Spectrogram

        self.spectrogram_extractor = Spectrogram(n_fft=window, hop_length=hop, win_length=window, window="hann",
                                                 center=True, pad_mode="reflect", freeze_parameters=True)
        self.logmel_extractor = LogmelFilterBank(sr=RATE, n_fft=window, n_mels=mel_bins, fmin=fmin, fmax=fmax,
                                                 ref=1.0, amin=1e-10, top_db=None, freeze_parameters=True)
        self.bn0 = nn.BatchNorm2d(mel_bins)
        widths = [1, 64, 128, 256, 512, 1024, 2048]
        for k in range(1, 7):
            setattr(self, f"conv_block{k}", ConvBlock(widths[k - 1], widths[k]))
        self.fc1 = nn.Linear(2048, 2048)
        self.fc_audioset = nn.Linear(2048, classes)

    def forward(self, wav: torch.Tensor) -> dict[str, torch.Tensor]:
        """wav [batch, samples] at 16 kHz -> {"logits": [batch, 527], "embedding": [batch, 2048]}."""
        x = self.logmel_extractor(self.spectrogram_extractor(wav))  # [batch, 1, frames, mel]
        x = self.bn0(x.transpose(1, 3)).transpose(1, 3)
        for k in range(1, 7):
            x = getattr(self, f"conv_block{k}")(x, 2 if k < 6 else 1)
        x = x.mean(dim=3)  # over mel
        x = x.max(dim=2).values + x.mean(dim=2)  # over time
        embedding = F.relu(self.fc1(x))
        return {"logits": self.fc_audioset(embedding), "embedding": embedding}


class PannsClassifier:
    """CNN14 logits and embeddings of clips, protocol above."""

    name = "panns"

    def __init__(self, model: Cnn14, device: str = "cpu"):
        self.model, self.device = model.to(device).eval(), device

    @classmethod
    def load(cls, path: str | Path | None, **kwargs) -> PannsClassifier:
        path = require_file(path, "--panns")
        model = Cnn14()
        load_strict(model, load_weights(path, "--panns", key="model"), path, "--panns")
        return cls(model, **kwargs)

    @staticmethod
    def prepare(wav: np.ndarray, rate: int) -> np.ndarray:
        """File samples -> [samples] at 16 kHz: first channel, DC removed, >= 2 s."""
        wav = audio_prep.first_channel(wav)
        wav = audio_prep.resample(wav - wav.mean(), rate, RATE, "torchaudio")
        return audio_prep.pad_to(wav, MIN_SAMPLES)[0]

    @torch.no_grad()
    def outputs(self, wav: np.ndarray, rate: int) -> tuple[np.ndarray, np.ndarray]:
        """File samples -> (softmax over the 527 logits, the 2048-d embedding)."""
        x = torch.from_numpy(np.ascontiguousarray(self.prepare(wav, rate), dtype=np.float32))[None]
        out = self.model(x.to(self.device))
        return (torch.softmax(out["logits"].double(), dim=-1)[0].cpu().numpy(),
                out["embedding"][0].double().cpu().numpy())
