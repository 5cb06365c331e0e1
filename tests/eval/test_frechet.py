"""Fréchet distance: known answers (FD(x, x) = 0, the closed form of diagonal Gaussians) and agreement with a
second implementation (scipy's matrix square root) on full covariances."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from ualm_nemo.eval.frechet import GaussianStats, frechet_distance


def _scipy_fd(a: GaussianStats, b: GaussianStats) -> float:
    root = scipy.linalg.sqrtm(a.cov @ b.cov)
    return float(((a.mean - b.mean) ** 2).sum() + np.trace(a.cov) + np.trace(b.cov) - 2 * np.trace(root.real))


def test_identical_sets_are_at_distance_zero():
    x = np.random.default_rng(0).normal(size=(500, 32))
    stats = GaussianStats.of(x)
    assert abs(frechet_distance(stats, stats)) < 1e-9
    assert stats.count == 500 and stats.cov.shape == (32, 32)


def test_diagonal_gaussians_match_the_closed_form():
    mean_a, mean_b = np.arange(4.0), np.arange(4.0)[::-1].copy()
    var_a, var_b = np.array([1.0, 2.0, 0.5, 3.0]), np.array([4.0, 0.25, 1.0, 1.0])
    a = GaussianStats(mean_a, np.diag(var_a), 0)
    b = GaussianStats(mean_b, np.diag(var_b), 0)
    expected = ((mean_a - mean_b) ** 2).sum() + ((np.sqrt(var_a) - np.sqrt(var_b)) ** 2).sum()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-12)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-12)  # symmetric


@pytest.mark.parametrize("dim", [8, 128])
def test_full_covariances_agree_with_scipy(dim):
    rng = np.random.default_rng(dim)
    mix = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    a = GaussianStats.of(rng.normal(size=(4 * dim, dim)) @ mix)
    b = GaussianStats.of(rng.normal(size=(4 * dim, dim)) @ mix.T + 0.3)
    assert frechet_distance(a, b) == pytest.approx(_scipy_fd(a, b), rel=1e-6)


def test_rank_deficient_covariance_stays_finite_and_non_negative():
    rng = np.random.default_rng(1)
    low = rng.normal(size=(10, 3)) @ rng.normal(size=(3, 16))  # 10 frames in 16-d: covariance of rank <= 3
    fd = frechet_distance(GaussianStats.of(low), GaussianStats.of(low + 1e-3))
    assert np.isfinite(fd) and fd >= -1e-9


def test_bad_embeddings_are_refused():
    with pytest.raises(ValueError, match="n >= 2"):
        GaussianStats.of(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="NaN"):
        GaussianStats.of(np.full((3, 4), np.nan))
    with pytest.raises(ValueError, match="sizes differ"):
        frechet_distance(GaussianStats.of(np.eye(3)), GaussianStats.of(np.eye(4)))
