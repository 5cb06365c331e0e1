"""The X-Codec encode/decode round trip applied to the enhancer's 16 kHz input (learning to undo its artefacts)."""

from __future__ import annotations

from pathlib import Path

import torch

from ualm_nemo.codec.xcodec import CodecTokenizer


class CodecRoundTrip:
    def __init__(self, tokenizer: CodecTokenizer) -> None:
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "CodecRoundTrip":
        if not Path(path).is_dir():
            raise FileNotFoundError(f"{path}: no such folder")
        return cls(CodecTokenizer.from_pretrained(path))

    @torch.no_grad()
    def __call__(self, wav: torch.Tensor) -> torch.Tensor:
        """[B, 1, n] -> [B, 1, n] (codec frames cover whole 320-sample hops; the tail is zero-filled)."""
        device = wav.device
        self.tokenizer.to(device)
        out = torch.zeros_like(wav)
        for row, codes in enumerate(self.tokenizer.encode([w[0] for w in wav])):
            decoded = self.tokenizer.decode(codes).to(device)
            out[row, 0, : decoded.shape[-1]] = decoded[: wav.shape[-1]]
        return out
