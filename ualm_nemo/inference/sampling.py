"""Sampling primitives: classifier-free guidance mix and temperature / top-k sampling."""

from __future__ import annotations

import torch


def cfg_mix(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """logits = scale * cond + (1 - scale) * uncond (scale 1 = no guidance)."""
    return scale * cond + (1.0 - scale) * uncond


def sample_top_k(logits: torch.Tensor, temperature: float, top_k: int, uniforms: torch.Tensor) -> torch.Tensor:
    """logits [..., V] -> ids [...]: softmax(logits / temperature) over the ``top_k`` largest (0: all), sampled by
    inverting its CDF at ``uniforms`` [...] in [0, 1); temperature 0 is greedy.

    The draws come from the caller (one generator per request), so a row's pick depends on its own logits and
    draws only: batched rows sample exactly as they would alone. Sorting by the top-k first keeps the CDF short.
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    k = top_k if 0 < top_k < logits.shape[-1] else logits.shape[-1]
    values, index = torch.topk(logits.float() / temperature, k, dim=-1)  # descending
    cdf = torch.softmax(values, dim=-1).cumsum(dim=-1)
    target = (uniforms.to(cdf.device) * cdf[..., -1]).unsqueeze(-1).contiguous()
    pick = torch.searchsorted(cdf.contiguous(), target).clamp(max=k - 1)  # first entry whose CDF reaches the draw
    return index.gather(-1, pick).squeeze(-1)
