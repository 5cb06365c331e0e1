"""The plain baseline the enhancement VAE is measured against: band-limited resampling, the channel duplicated.

It lives here, beside the enhancer, so that the enhance package imports nothing from inference/ (which loads the
enhancer for ``--enhancer``: inference/postprocess.py); inference/postprocess.py re-exports it.
"""

from __future__ import annotations

from math import gcd

import numpy as np
import torch
from scipy.signal import resample_poly

from ualm_nemo.enhance.config import INPUT_RATE


class SincResampler:
    """16 kHz mono -> ``sample_rate`` (polyphase sinc resampling), the channel repeated ``channels`` times."""

    def __init__(self, sample_rate: int = 48000, channels: int = 2):
        if sample_rate <= 0 or channels <= 0:
            raise ValueError(f"sample_rate={sample_rate} and channels={channels} must be positive")
        self.sample_rate, self.channels = sample_rate, channels

    def __call__(self, wav: torch.Tensor) -> torch.Tensor:
        g = gcd(self.sample_rate, INPUT_RATE)
        out = resample_poly(wav.double().numpy(), self.sample_rate // g, INPUT_RATE // g).astype(np.float32)
        return torch.from_numpy(out)[None].repeat(self.channels, 1)
