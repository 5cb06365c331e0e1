"""Packed attention mask (hand-checked), bucketing under a token budget, packing, blend proportions."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from ualm_nemo.data.batching import bucket_batches, collate_packed, pack_rows
from ualm_nemo.model.attention_mask import packed_attention_mask
from ualm_nemo.data.blend import SourceSpec, blend_probabilities, window_choices, window_counts
from ualm_nemo.data.formatting import SampleFormatter
from ualm_nemo.data.tokenizer import ByteChatTokenizer
from ualm_nemo.model.vocab import IGNORE_INDEX, UnifiedVocab

V = UnifiedVocab(text_vocab_size=384)


def test_packed_attention_mask_by_hand():
    seg = torch.tensor([[0, 0, 0, 1, 1, -1]])
    o, X = False, True  # o: may attend, X: masked
    expected = torch.tensor([
        [o, X, X, X, X, X],
        [o, o, X, X, X, X],
        [o, o, o, X, X, X],
        [X, X, X, o, X, X],
        [X, X, X, o, o, X],
        [X, X, X, X, X, o],
    ])
    mask = packed_attention_mask(seg)
    assert mask.shape == (1, 1, 6, 6) and mask.dtype == torch.bool
    assert torch.equal(mask[0, 0], expected)
    # one unpadded sample: the ordinary causal mask
    assert torch.equal(packed_attention_mask(torch.zeros(2, 4, dtype=torch.long))[1, 0],
                       ~torch.ones(4, 4, dtype=torch.bool).tril())


def test_bucket_batches_respects_budget_and_covers_all():
    rng = random.Random(0)
    lengths = [rng.randint(5, 300) for _ in range(500)]
    batches = bucket_batches(lengths, max_tokens=1024, pad_to_multiple=8)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(500))
    for b in batches:
        longest = -(-max(lengths[i] for i in b) // 8) * 8
        assert len(b) * longest <= 1024
    assert max(len(b) for b in batches) > 3 * min(len(b) for b in batches[:-1])  # short samples: bigger batches
    assert all(len(b) <= 4 for b in bucket_batches(lengths, 1024, max_rows=4))
    with pytest.raises(ValueError, match="token budget"):
        bucket_batches([2000], 1024)


def test_pack_rows_fits_and_covers_all():
    rng = random.Random(1)
    lengths = [rng.randint(10, 400) for _ in range(300)]
    rows = pack_rows(lengths, 512)
    assert sorted(i for r in rows for i in r) == list(range(300))
    assert all(sum(lengths[i] for i in r) <= 512 for r in rows)
    assert sum(lengths) / (len(rows) * 512) > 0.9  # first-fit decreasing packs tightly
    with pytest.raises(ValueError, match="does not fit"):
        pack_rows([600], 512)


def test_collate_packed_resets_positions_and_never_learns_across_samples():
    fmt = SampleFormatter(ByteChatTokenizer(), V, cfg_dropout=0.0)
    rng = random.Random(0)
    codes = torch.randint(0, 1024, (6, 8), generator=torch.Generator().manual_seed(0))
    samples = [fmt.format_text([("user", "hi"), ("assistant", "yo")]), fmt.format_tta("a hum", codes, rng),
               fmt.format_text([("user", "2+2?"), ("assistant", "4")])]
    lens = [s["tokens"].shape[0] for s in samples]
    seq = lens[0] + lens[1] + 3
    batch = collate_packed([[samples[0], samples[1]], [samples[2]]], V, seq)
    assert batch.tokens.shape == batch.labels.shape == batch.loss_weights.shape == (2, seq, 8)
    assert batch.segment_ids[0].tolist() == [0] * lens[0] + [1] * lens[1] + [-1] * 3
    assert batch.segment_ids[1].tolist() == [0] * lens[2] + [-1] * (seq - lens[2])
    assert batch.position_ids[0, :lens[0] + lens[1]].tolist() == list(range(lens[0])) + list(range(lens[1]))
    assert batch.lengths.tolist() == [lens[0] + lens[1], lens[2]] and batch.tasks == ["text", "tta", "text"]
    assert torch.equal(batch.tokens[0, lens[0]:lens[0] + lens[1]], samples[1]["tokens"])
    assert torch.equal(batch.loss_weights[0, :lens[0]], samples[0]["loss_weights"])
    # the label at each sample's last position is IGNORE on every stream: nothing predicts the next sample
    for end in (lens[0] - 1, lens[0] + lens[1] - 1):
        assert bool((batch.labels[0, end] == IGNORE_INDEX).all())
    assert bool((batch.labels[0, -3:] == IGNORE_INDEX).all()) and float(batch.loss_weights[0, -3:].sum()) == 0
    assert batch.audio_features is None
    bad = dict(samples[0], labels=samples[0]["labels"].clone())
    bad["labels"][-1, 0] = 5
    with pytest.raises(ValueError, match="last label"):
        collate_packed([[bad]], V, seq)


def test_blend_proportions_within_three_sigma():
    probs = blend_probabilities([2.0, 1.0, 1.0], [100, 300, 100], "size")
    assert np.allclose(probs, [200 / 600, 300 / 600, 100 / 600])
    assert np.allclose(blend_probabilities([2.0, 1.0, 1.0], [100, 300, 100], "fixed"), [0.5, 0.25, 0.25])
    n_windows, size = 200, 256
    counts = sum(window_counts(probs, seed=7, rank=0, window=w, size=size) for w in range(n_windows))
    n = n_windows * size
    sigma = np.sqrt(n * probs * (1 - probs))
    assert (np.abs(counts - n * probs) < 3 * sigma).all(), (counts, n * probs)
    # deterministic given the seed; differs across seeds and ranks
    assert np.array_equal(window_choices(probs, 7, 0, 3, size), window_choices(probs, 7, 0, 3, size))
    assert not np.array_equal(window_choices(probs, 7, 0, 3, size), window_choices(probs, 8, 0, 3, size))
    assert not np.array_equal(window_choices(probs, 7, 0, 3, size), window_choices(probs, 7, 1, 3, size))


def test_blend_config_errors():
    with pytest.raises(ValueError, match="weight"):
        SourceSpec("a", "/x", weight=0.0)
    with pytest.raises(ValueError, match="weighting"):
        blend_probabilities([1.0], [10], "bogus")
    with pytest.raises(ValueError, match="at least one sample"):
        blend_probabilities([1.0, 1.0], [10, 0], "size")
