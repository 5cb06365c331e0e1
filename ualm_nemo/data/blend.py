"""Blending: which source each sample of the stream comes from, drawn per window, deterministic given the seed.

Sources are declared in config only (conf/data/shar.yaml)::

    sources:
      - {name: tta, shar_dir: /data/shar/audiocaps, weight: 2.0}
      - {name: und, shar_dir: /data/shar/af3, weight: 1.0}

``weighting: size`` (default): a source's probability is proportional to ``weight x num_samples`` (weight 2 =
"seen twice per epoch of the others": the paper's 2x generation up-weighting). ``weighting: fixed``: the
probability is ``weight`` itself (normalised), whatever the sizes.

The choices of window ``w`` are ``window_size`` i.i.d. draws from a generator seeded by (seed, rank, w): any
window's choices can be recomputed alone, which is what lets a resumed run (or a DataLoader worker) start at any
window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class SourceSpec:
    name: str
    shar_dir: str
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("name must be set")
        if not self.weight > 0:
            raise ValueError(f"weight={self.weight} must be > 0 (drop the source instead)")


WEIGHTINGS = ("size", "fixed")


def blend_probabilities(weights: Sequence[float], sizes: Sequence[int], weighting: str = "size") -> np.ndarray:
    """[num_sources] sampling probabilities (sum 1)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"data.shar.weighting={weighting!r}: choose one of {WEIGHTINGS}")
    w = np.asarray(weights, dtype=np.float64)
    if weighting == "size":
        w = w * np.asarray(sizes, dtype=np.float64)
    if not (w > 0).all():
        raise ValueError(f"every source needs a positive weight and at least one sample, got {w.tolist()}")
    return w / w.sum()


def window_choices(probs: np.ndarray, seed: int, rank: int, window: int, size: int) -> np.ndarray:
    """Source index [size] for each sample of window ``window`` on DP rank ``rank``."""
    rng = np.random.default_rng([seed, rank, window, 0xB1E4D])
    return rng.choice(len(probs), size=size, p=probs)


def window_counts(probs: np.ndarray, seed: int, rank: int, window: int, size: int) -> np.ndarray:
    """[num_sources] samples each source gives to window ``window``."""
    return np.bincount(window_choices(probs, seed, rank, window, size), minlength=len(probs))
