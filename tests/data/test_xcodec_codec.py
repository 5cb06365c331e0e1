"""CodecTokenizer over the tiny random X-Codec: shapes, frame rounding, ranges, decode, save/reload, seeding."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from lhotse.utils import compute_num_frames

from ualm_nemo.codec.xcodec import HOP_LENGTH, CodecTokenizer, build_tiny_xcodec, load_xcodec, num_codec_frames

LENGTHS = [16000, 8000 + 150, 8000 + 170, 23456, 321]  # whole, round-down, round-up, odd, < 2 frames


@pytest.fixture(scope="module")
def codec() -> CodecTokenizer:
    return CodecTokenizer(build_tiny_xcodec(seed=0), max_batch_size=3)


def _clips(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [0.3 * torch.randn(n, generator=g) for n in LENGTHS]


def test_num_codec_frames_matches_lhotse_rounding():
    for n in [1, 159, 160, 320, 479, 480, 16000, 16159, 16160, 48000]:
        assert num_codec_frames(n) == max(compute_num_frames(n / 16000, 0.02, 16000), 1), n


def test_encode_shapes_and_ranges(codec: CodecTokenizer):
    codes = codec.encode(_clips())
    assert codec.num_codebooks == 8 and codec.codebook_size == 1024
    assert [c.shape for c in codes] == [(num_codec_frames(n), 8) for n in LENGTHS]
    assert [c.shape[0] for c in codes] == [50, 25, 26, 73, 1]
    for c in codes:
        assert c.dtype == torch.long
        assert int(c.min()) >= 0 and int(c.max()) < 1024
    assert codes[0].unique().numel() > 20  # randomised codebooks: not the all-zero init


def test_batched_equals_one_by_one_for_equal_lengths(codec: CodecTokenizer):
    """Clips of one frame count share a batch with no padding, so batching must not change their codes."""
    g = torch.Generator().manual_seed(1)
    clips = [0.3 * torch.randn(16000, generator=g) for _ in range(3)]
    batched = codec.encode(clips)
    alone = CodecTokenizer(codec.model, max_batch_size=1).encode(clips)
    for a, b in zip(batched, alone):
        assert torch.equal(a, b)


def test_decode_shape(codec: CodecTokenizer):
    codes = codec.encode(_clips()[:1])[0]
    wav = codec.decode(codes)
    assert wav.shape == (codes.shape[0] * HOP_LENGTH,) and wav.dtype == torch.float32
    assert bool(torch.isfinite(wav).all())
    with pytest.raises(ValueError, match="strip delay pads"):
        codec.decode(torch.full((2, 8), 1024))


def test_save_and_reload_gives_identical_codes(codec: CodecTokenizer, tmp_path):
    codec.save_pretrained(tmp_path / "tiny_xcodec")
    reloaded = CodecTokenizer.from_pretrained(tmp_path / "tiny_xcodec", max_batch_size=3)
    for a, b in zip(codec.encode(_clips()), reloaded.encode(_clips())):
        assert torch.equal(a, b)


def test_tiny_codec_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b, c = build_tiny_xcodec(3), build_tiny_xcodec(3), build_tiny_xcodec(4)
    assert torch.equal(torch.random.get_rng_state(), state)
    emb = "quantizer.quantizers.0.codebook.embed"
    assert torch.equal(a.state_dict()[emb], b.state_dict()[emb])
    assert not torch.equal(a.state_dict()[emb], c.state_dict()[emb])


def test_load_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_xcodec(tmp_path)


def test_encode_rejects_bad_input(codec: CodecTokenizer):
    with pytest.raises(ValueError):
        codec.encode([torch.zeros(0)])
    with pytest.raises(ValueError):
        codec.encode([torch.zeros(2, 100)])
