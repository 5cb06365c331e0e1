"""Class-probability statistics of the TTA metrics: Inception Score (PANNs) and paired KL (PaSST).

Protocols (audioldm_eval / stable-audio-metrics):
* IS: softmax over the classifier's 527 AudioSet classes per clip; the clips shuffled with
  ``numpy.random.RandomState(2020)`` and cut into 10 splits at audioldm_eval's boundaries (split i holds
  rows ``i*N//10 : (i+1)*N//10``, not ``np.array_split``'s, which differ when N is not a multiple of 10);
  per split exp(mean_i KL(p_i || mean_j p_j));
  reported as the mean and the population standard deviation over splits.
* KL: per clip pair (generated, reference), the softmax of each clip's window-averaged logits.
  stable-audio-metrics computes torch's ``kl_div(log(p_ref + 1e-6), p_gen, reduction="sum")``, i.e.
  KL(gen || ref) = sum p_gen (log p_gen - log(p_ref + 1e-6)); ``direction="ref||gen"`` is audioldm_eval's
  other direction. The caller averages over pairs.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

EPS = 1e-6


def _probabilities(p: np.ndarray, name: str) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] == 0:
        raise ValueError(f"{name}: expected class probabilities [clips, classes], got shape {p.shape}")
    if not np.isfinite(p).all() or (p < 0).any() or not np.allclose(p.sum(1), 1.0, atol=1e-4):
        raise ValueError(f"{name}: rows must be finite, non-negative and sum to 1 (softmax outputs)")
    return p


def inception_score(probs: np.ndarray, splits: int = 10, seed: int = 2020) -> tuple[float, float]:
    """probs [clips, classes] -> (mean, population std) of the IS over ``splits`` shuffled splits."""
    p = _probabilities(probs, "inception_score")
    if not 1 <= splits <= p.shape[0]:
        raise ValueError(f"splits={splits} must lie in [1, number of clips={p.shape[0]}]")
    p = p[np.random.RandomState(seed).permutation(p.shape[0])]
    scores = []
    n = p.shape[0]
    for i in range(splits):
        part = p[i * n // splits: (i + 1) * n // splits]  # audioldm_eval's split boundaries
        marginal = part.mean(axis=0, keepdims=True)
        kl = (part * (np.log(part + 1e-12) - np.log(marginal + 1e-12))).sum(axis=1)
        scores.append(float(np.exp(kl.mean())))
    return float(np.mean(scores)), float(np.std(scores))


def paired_kl(generated: np.ndarray, reference: np.ndarray,
              direction: Literal["gen||ref", "ref||gen"] = "gen||ref") -> np.ndarray:
    """Per-pair KL [pairs] between generated and reference class probabilities (rows paired by clip id)."""
    gen, ref = _probabilities(generated, "generated"), _probabilities(reference, "reference")
    if gen.shape != ref.shape:
        raise ValueError(f"generated {gen.shape} and reference {ref.shape} must pair up row by row")
    if direction == "gen||ref":
        p, q = gen, ref
    elif direction == "ref||gen":
        p, q = ref, gen
    else:
        raise ValueError(f"direction={direction!r}: 'gen||ref' (stable-audio-metrics) or 'ref||gen'")
    return (np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0) - p * np.log(q + EPS)).sum(axis=1)
