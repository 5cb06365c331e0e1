"""The enhancement VAE: 16 kHz mono in, a KL-regularised 50 Hz latent, 48 kHz stereo out."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ualm_nemo.enhance.config import INPUT_RATE, OUTPUT_RATE, EnhancerConfig
from ualm_nemo.enhance.oobleck import Decoder, Encoder

UPSAMPLE = OUTPUT_RATE // INPUT_RATE  # 3


@dataclass
class VAEOutput:
    audio: torch.Tensor  # [B, out_channels, 3 * L]
    kl: torch.Tensor  # scalar: mean over batch and latent frames of the KL to N(0, I), summed over latent dims
    mean: torch.Tensor  # [B, latent_dim, F]
    scale: torch.Tensor


def gaussian_kl(mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, scale^2) || N(0, 1)) summed over the latent dimension, averaged over batch and frames."""
    var = scale.pow(2)
    return 0.5 * (mean.pow(2) + var - var.log() - 1).sum(1).mean()


class EnhancementVAE(nn.Module):
    def __init__(self, config: EnhancerConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(1, config.channels, config.encoder_mults, config.encoder_strides,
                               2 * config.latent_dim)
        self.decoder = Decoder(config.latent_dim, config.channels, config.decoder_mults, config.decoder_strides,
                               config.out_channels)

    def _check(self, wav: torch.Tensor) -> None:
        if wav.dim() != 3 or wav.shape[1] != 1:
            raise ValueError(f"the enhancer takes 16 kHz mono as [batch, 1, samples]; got shape {tuple(wav.shape)}")

    def encode(self, wav: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, 1, L] at 16 kHz -> posterior (mean, scale), each [B, latent_dim, ceil(L / 320)] (right zero-pad)."""
        self._check(wav)
        pad = -wav.shape[-1] % self.config.hop
        stats = self.encoder(F.pad(wav, (0, pad)))
        mean, raw_scale = stats.chunk(2, dim=1)
        return mean, F.softplus(raw_scale) + 1e-4

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """[B, latent_dim, F] -> [B, out_channels, 960 F] at 48 kHz."""
        return self.decoder(latent)

    def latent_frames(self, samples: int) -> int:
        return -(-samples // self.config.hop)

    def forward(self, wav: torch.Tensor, noise: torch.Tensor | None = None) -> VAEOutput:
        """Reconstruct at 48 kHz, cropped to exactly 3x the input length. ``noise`` [B, latent_dim, F] ~ N(0, 1)
        samples the posterior (training); None decodes its mean (inference). The caller draws the noise so that
        it can be a function of each sample's identity (the same under any data-parallel split)."""
        mean, scale = self.encode(wav)
        latent = mean if noise is None else mean + scale * noise.to(mean)
        audio = self.decode(latent)[..., : wav.shape[-1] * UPSAMPLE]
        return VAEOutput(audio, gaussian_kl(mean, scale), mean, scale)

    @torch.no_grad()
    def enhance(self, wav: torch.Tensor) -> torch.Tensor:
        """Deterministic enhancement (posterior mean): [B, 1, L] -> [B, out_channels, 3 L]."""
        return self(wav).audio


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
