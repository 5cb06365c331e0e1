"""A stand-in codec for loader tests: instant, deterministic, same interface as CodecTokenizer.encode.

It is a test double for speed only (the real tiny X-Codec is exercised by tests/data/test_xcodec_codec.py and
the training tests); loader tests need many shards quickly.
"""

from __future__ import annotations

import torch


class HashCodec:
    """Stand-in for CodecTokenizer (same interface, instant): codes are a deterministic function of the audio."""

    num_codebooks, codebook_size = 8, 1024

    def encode(self, wavs):
        from ualm_nemo.codec.xcodec import num_codec_frames

        out = []
        for w in wavs:
            seed = int(torch.round(w[:64].abs().sum() * 1e4)) % (2**31)
            g = torch.Generator().manual_seed(seed + w.shape[0])
            out.append(torch.randint(0, 1024, (num_codec_frames(w.shape[0]), 8), generator=g))
        return out
