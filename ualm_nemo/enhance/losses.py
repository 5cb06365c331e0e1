"""Enhancer losses: stereo multi-resolution STFT, multi-scale mel, hinge GAN with feature matching, KL.

The spectral losses come from auraloss (Apache-2.0): sum-and-difference (mid/side) multi-resolution STFT plus the
same loss on left/right at half weight, the Stable Audio / ETTA stereo recipe; 7 resolutions 2048..32, hop n/4.
Every term is a mean over samples (spectral convergence excepted: a ratio of norms over the batch), so DDP's
gradient average over ranks equals the gradient of the whole batch.
"""

from __future__ import annotations

import torch
from auraloss.freq import MultiResolutionSTFTLoss, SumAndDifferenceSTFTLoss
from torch import nn

from ualm_nemo.enhance.config import OUTPUT_RATE, LossWeights

STFT_FFTS = (2048, 1024, 512, 256, 128, 64, 32)
MEL_FFTS = (512, 1024, 2048)


def _resolutions(ffts: tuple[int, ...]) -> dict[str, list[int]]:
    return {"fft_sizes": list(ffts), "hop_sizes": [n // 4 for n in ffts], "win_lengths": list(ffts)}


class StereoSTFTLoss(nn.Module):
    """Mid/side MR-STFT + 0.5 x left/right MR-STFT (mono output: the plain MR-STFT)."""

    def __init__(self, spectral_convergence: float = 1.0) -> None:
        super().__init__()
        kw = dict(_resolutions(STFT_FFTS), w_sc=spectral_convergence, w_log_mag=1.0, w_lin_mag=0.0)
        self.mid_side = SumAndDifferenceSTFTLoss(**kw)
        self.plain = MultiResolutionSTFTLoss(**kw)

    def forward(self, estimate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if estimate.shape != target.shape:
            raise ValueError(f"estimate {tuple(estimate.shape)} and target {tuple(target.shape)} differ")
        estimate, target = estimate.float(), target.float()
        if estimate.shape[1] == 1:
            return self.plain(estimate, target)
        return self.mid_side(estimate, target) + 0.5 * self.plain(estimate, target)


class MultiScaleMelLoss(nn.Module):
    """L1 of log-mel magnitudes at three resolutions (64 mel bands at 48 kHz)."""

    def __init__(self, sample_rate: int = OUTPUT_RATE, bands: int = 64) -> None:
        super().__init__()
        self.loss = MultiResolutionSTFTLoss(**_resolutions(MEL_FFTS), w_sc=0.0, w_log_mag=1.0, w_lin_mag=0.0,
                                            sample_rate=sample_rate, scale="mel", n_bins=bands)

    def forward(self, estimate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss(estimate.float(), target.float())


def discriminator_hinge(logits_real: list[torch.Tensor], logits_fake: list[torch.Tensor]) -> torch.Tensor:
    terms = [torch.relu(1 - r).mean() + torch.relu(1 + f).mean() for r, f in zip(logits_real, logits_fake)]
    return torch.stack(terms).mean()


def generator_hinge(logits_fake: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([torch.relu(1 - f).mean() for f in logits_fake]).mean()


def feature_matching(feats_real: list[list[torch.Tensor]], feats_fake: list[list[torch.Tensor]]) -> torch.Tensor:
    """Mean over resolutions, layers and samples of L1(fake, real) relative to each sample's real feature
    magnitude (per sample, so a data-parallel split averages to the whole batch's value)."""
    def relative(r: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        r = r.detach()
        return ((f - r).abs().flatten(1).mean(1) / (r.abs().flatten(1).mean(1) + 1e-8)).mean()
    terms = [relative(r, f) for rs, fs in zip(feats_real, feats_fake) for r, f in zip(rs, fs)]
    return torch.stack(terms).mean()


class GeneratorLoss(nn.Module):
    """The weighted sum for the VAE step; returns (total, {name: value}) with every term for logging."""

    def __init__(self, weights: LossWeights, sample_rate: int = OUTPUT_RATE) -> None:
        super().__init__()
        self.weights = weights
        self.stft = StereoSTFTLoss(weights.spectral_convergence)
        self.mel = MultiScaleMelLoss(sample_rate)

    def forward(self, estimate: torch.Tensor, target: torch.Tensor, kl: torch.Tensor,
                disc_out=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        w = self.weights
        terms = {"stft": self.stft(estimate, target), "mel": self.mel(estimate, target), "kl": kl}
        total = w.stft * terms["stft"] + w.mel * terms["mel"] + w.kl * kl
        if disc_out is not None:
            _, logits_fake, feats_real, feats_fake = disc_out
            terms["adversarial"] = generator_hinge(logits_fake)
            terms["feature_matching"] = feature_matching(feats_real, feats_fake)
            total = total + w.adversarial * terms["adversarial"] + w.feature_matching * terms["feature_matching"]
        terms["total"] = total
        return total, terms
