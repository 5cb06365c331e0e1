"""IS and paired KL against known answers."""

from __future__ import annotations

import numpy as np
import pytest

from ualm_nemo.eval.divergences import inception_score, paired_kl


def test_inception_score_known_answers():
    uniform = np.full((40, 527), 1 / 527)
    mean, std = inception_score(uniform)
    assert mean == pytest.approx(1.0) and std == pytest.approx(0.0)  # no confidence: IS 1
    one_hot = np.eye(4)[np.arange(400) % 4]  # confident and evenly spread over 4 classes
    mean, _ = inception_score(one_hot, splits=1)
    assert mean == pytest.approx(4.0, rel=1e-6)  # IS = number of classes
    again = inception_score(one_hot[::-1], splits=10)
    assert again == inception_score(one_hot[::-1], splits=10)  # fixed shuffle seed: reproducible


def test_paired_kl_known_answers_and_direction():
    p = np.array([[0.5, 0.5], [0.9, 0.1]])
    q = np.array([[0.5, 0.5], [0.5, 0.5]])
    kl = paired_kl(p, q)
    assert kl[0] == pytest.approx(0.0, abs=1e-5)
    expected = 0.9 * np.log(0.9 / (0.5 + 1e-6)) + 0.1 * np.log(0.1 / (0.5 + 1e-6))
    assert kl[1] == pytest.approx(expected, rel=1e-9)
    other = 0.5 * np.log(0.5 / (0.9 + 1e-6)) + 0.5 * np.log(0.5 / (0.1 + 1e-6))
    assert paired_kl(p, q, direction="ref||gen")[1] == pytest.approx(other, rel=1e-9)


def test_bad_probabilities_are_refused():
    with pytest.raises(ValueError, match="sum to 1"):
        inception_score(np.ones((10, 3)))
    with pytest.raises(ValueError, match="pair up"):
        paired_kl(np.full((2, 2), 0.5), np.full((3, 2), 0.5))
    with pytest.raises(ValueError, match="splits"):
        inception_score(np.full((3, 2), 0.5), splits=5)


def test_inception_score_splits_at_audioldm_eval_boundaries():
    """957 clips: audioldm_eval's splits are rows i*N//10 : (i+1)*N//10 of the seeded shuffle (np.array_split
    puts the 7 spare rows in the first splits instead, which moves the score)."""
    logits = np.random.default_rng(3).standard_normal((957, 527)) * 4
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    n = len(p)
    shuffled = p[np.random.RandomState(2020).permutation(n)]
    scores = []
    for i in range(10):  # audioldm_eval metrics/isc.py, written out
        chunk = shuffled[i * n // 10: (i + 1) * n // 10]
        kl = (chunk * (np.log(chunk) - np.log(chunk.mean(0, keepdims=True)))).sum(1)
        scores.append(np.exp(kl.mean()))
    mean, std = inception_score(p)
    assert mean == pytest.approx(np.mean(scores), rel=1e-9) and std == pytest.approx(np.std(scores), rel=1e-9)
