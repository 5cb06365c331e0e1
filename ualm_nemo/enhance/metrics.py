"""Enhancer metrics: log-spectral distance (full band and above 8 kHz), MR-STFT distance, low-band consistency.

LSD as ssr_eval defines it: per frame sqrt(mean over frequency bins of log10(S_ref / S_est)^2) with power spectra
S (2048-point Hann STFT, hop 512, a 1e-8 floor), averaged over frames and channels. It is sensitive to energy
scaling: both signals are compared as they are. ``min_hz=8000`` keeps the bins a 16 kHz input cannot carry.
Low-band consistency: the output, down-mixed and resampled to 16 kHz, against the input (LSD at 16 kHz and SNR).
"""

from __future__ import annotations

import torch
from auraloss.freq import MultiResolutionSTFTLoss

from ualm_nemo.enhance.config import INPUT_RATE, OUTPUT_RATE
from ualm_nemo.enhance.data import to_input

EPS = 1e-8


def _power(wav: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    spec = torch.stft(wav.double(), n_fft, hop, window=torch.hann_window(n_fft, dtype=torch.float64),
                      return_complex=True)
    return spec.abs().pow(2)  # [C, bins, frames]


def lsd(reference: torch.Tensor, estimate: torch.Tensor, sample_rate: int = OUTPUT_RATE, min_hz: float = 0.0,
        n_fft: int = 2048, hop: int = 512) -> float:
    """``reference``, ``estimate``: [C, T] (or [T]) at ``sample_rate``."""
    if reference.shape != estimate.shape:
        raise ValueError(f"lsd: shapes differ {tuple(reference.shape)} vs {tuple(estimate.shape)}")
    ref, est = reference.reshape(-1, reference.shape[-1]), estimate.reshape(-1, estimate.shape[-1])
    s_ref, s_est = _power(ref, n_fft, hop), _power(est, n_fft, hop)
    freqs = torch.arange(s_ref.shape[1]) * sample_rate / n_fft
    keep = freqs >= min_hz
    log_ratio = torch.log10((s_ref[:, keep] + EPS) / (s_est[:, keep] + EPS))
    return float(log_ratio.pow(2).mean(1).sqrt().mean())


_MRSTFT = MultiResolutionSTFTLoss(fft_sizes=[2048, 1024, 512], hop_sizes=[512, 256, 128], win_lengths=[2048, 1024, 512])


def mrstft_distance(reference: torch.Tensor, estimate: torch.Tensor) -> float:
    """auraloss MR-STFT (spectral convergence + log magnitude) over all channels; [C, T] each."""
    return float(_MRSTFT(estimate[None].float(), reference[None].float()))


def low_band_consistency(inputs: torch.Tensor, output: torch.Tensor) -> dict[str, float]:
    """``inputs`` [1, n] at 16 kHz, ``output`` [C, 3n] at 48 kHz (mono output is duplicated first)."""
    stereo = output if output.shape[0] == 2 else output.expand(2, -1)
    back = to_input(stereo.float())[..., : inputs.shape[-1]]
    noise = (back - inputs).pow(2).sum()
    snr = 10 * torch.log10(inputs.pow(2).sum() / noise.clamp_min(1e-12))
    return {"low_band_lsd": lsd(inputs, back, INPUT_RATE), "low_band_snr_db": float(snr)}


def all_metrics(reference: torch.Tensor, estimate: torch.Tensor, inputs: torch.Tensor) -> dict[str, float]:
    return {"lsd": lsd(reference, estimate), "lsd_high": lsd(reference, estimate, min_hz=8000.0),
            "mrstft": mrstft_distance(reference, estimate), **low_band_consistency(inputs, estimate)}
