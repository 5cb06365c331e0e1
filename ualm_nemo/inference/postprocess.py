"""Post-processors: what happens to the codec's 16 kHz mono audio before it is delivered.

The 48 kHz stereo enhancement VAE plugs in here (it implements :class:`AudioPostProcessor`). ``SincResampler``
is the plain baseline that VAE is measured against: band-limited resampling with the channel duplicated.
"""

from __future__ import annotations

from math import gcd
from typing import Protocol

import numpy as np
import torch
from scipy.signal import resample_poly

CODEC_RATE = 16000


class AudioPostProcessor(Protocol):
    sample_rate: int  # of the output

    def __call__(self, wav: torch.Tensor) -> torch.Tensor:
        """wav [samples] at 16 kHz -> [channels, samples'] at ``sample_rate``."""


class SincResampler:
    """16 kHz mono -> ``sample_rate`` (polyphase sinc resampling), the channel repeated ``channels`` times."""

    def __init__(self, sample_rate: int = 48000, channels: int = 2):
        if sample_rate <= 0 or channels <= 0:
            raise ValueError(f"sample_rate={sample_rate} and channels={channels} must be positive")
        self.sample_rate, self.channels = sample_rate, channels

    def __call__(self, wav: torch.Tensor) -> torch.Tensor:
        g = gcd(self.sample_rate, CODEC_RATE)
        out = resample_poly(wav.double().numpy(), self.sample_rate // g, CODEC_RATE // g).astype(np.float32)
        return torch.from_numpy(out)[None].repeat(self.channels, 1)
