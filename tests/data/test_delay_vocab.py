"""Delay pattern (property-based round trip, hand-written grid) and unified-vocabulary layout."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ualm_nemo.model.delay_pattern import apply_delay, revert_delay
from ualm_nemo.model.vocab import SPECIALS, UnifiedVocab

# ---------------------------------------------------------------- delay pattern


@settings(max_examples=60, deadline=None)
@given(num_frames=st.integers(0, 50), num_streams=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_revert_inverts_apply(num_frames: int, num_streams: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1024, (num_frames, num_streams), generator=g)
    delayed = apply_delay(codes, pad=1024)
    assert delayed.shape == (num_frames + num_streams - 1, num_streams)
    assert torch.equal(revert_delay(delayed), codes)
    # every cell outside the shifted codes is a pad: (T+N-1)*N cells, T*N of them codes
    assert int((delayed == 1024).sum()) == (num_frames + num_streams - 1) * num_streams - num_frames * num_streams


def test_apply_delay_hand_written_grid():
    codes = torch.tensor([[1, 2, 3],
                          [4, 5, 6]])
    p = 9
    expected = torch.tensor([[1, p, p],
                             [4, 2, p],
                             [p, 5, 3],
                             [p, p, 6]])
    assert torch.equal(apply_delay(codes, pad=p), expected)


def test_apply_delay_per_stream_pad():
    codes = torch.zeros(1, 3, dtype=torch.long)
    out = apply_delay(codes, pad=torch.tensor([7, 8, 9]))
    assert out.tolist() == [[0, 8, 9], [7, 0, 9], [7, 8, 0]]


def test_revert_rejects_short_grid():
    with pytest.raises(ValueError):
        revert_delay(torch.zeros(3, 8, dtype=torch.long))


# ---------------------------------------------------------------- vocabulary


@pytest.fixture
def vocab() -> UnifiedVocab:
    return UnifiedVocab(text_vocab_size=384)


def test_size_formula(vocab: UnifiedVocab):
    assert vocab.size == 384 + len(SPECIALS) + 8 * (1024 + 1)
    assert UnifiedVocab(152064).size == 152064 + 4 + 8200


def test_ranges_are_disjoint_and_contiguous(vocab: UnifiedVocab):
    specials = [vocab.special_id(s) for s in SPECIALS]
    assert specials == list(range(384, 384 + len(SPECIALS)))
    assert {vocab.audio_start_id, vocab.audio_end_id, vocab.audio_in_id, vocab.pad_id} == set(specials)
    ids = list(range(384)) + specials
    for n in range(8):
        assert vocab.codebook_start(n) == vocab.audio_offset + n * 1025
        ids += list(range(vocab.codebook_start(n), vocab.codebook_start(n) + 1025))
    assert ids == list(range(vocab.size))  # every id used exactly once, no gaps


def test_pads_per_codebook(vocab: UnifiedVocab):
    pads = vocab.audio_pad_ids()
    assert pads.tolist() == [vocab.codebook_start(n) + 1024 for n in range(8)]
    assert vocab.ids_to_codes(pads).tolist() == [1024] * 8
    assert vocab.text_position_streams(5) == [5] + pads[1:].tolist()


def test_codes_ids_inverse(vocab: UnifiedVocab):
    codes = torch.randint(0, 1025, (17, 8), generator=torch.Generator().manual_seed(0))
    ids = vocab.codes_to_ids(codes)
    for n in range(8):  # each stream lands in its own codebook
        assert bool(((ids[:, n] >= vocab.codebook_start(n)) & (ids[:, n] <= vocab.audio_pad_id(n))).all())
    assert torch.equal(vocab.ids_to_codes(ids), codes)


def test_ids_to_codes_rejects_foreign_ids(vocab: UnifiedVocab):
    ids = vocab.codes_to_ids(torch.zeros(1, 8, dtype=torch.long))
    ids[0, 3] = vocab.codebook_start(4)  # codebook 4's id on stream 3
    with pytest.raises(ValueError):
        vocab.ids_to_codes(ids)
    with pytest.raises(KeyError):
        vocab.special_id("<|nope|>")
