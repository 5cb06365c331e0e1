"""Unified vocabulary: Qwen text ids, UALM specials, then 8 audio codebooks of (1024 codes + 1 pad).

Layout (ids ascending)::

    [0, text_vocab_size)                      text tokenizer ids, unchanged (HF embedding rows map 1:1)
    [text_vocab_size, +len(SPECIALS))          UALM specials (<|audio_start|>, <|audio_end|>, <|audio_in|>, <|pad|>)
    audio_offset + n*(codebook_size+1) + c     code c of codebook n; c == codebook_size is codebook n's pad

Text keeps its ids so a Qwen2.5 checkpoint's embedding rows import without a permutation; the specials
and audio rows are appended (text first, so that the import needs no permutation). The embedding of every codebook pad is held at zero, so a text
position carrying pads on streams 1..7 embeds as its text token alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SPECIALS = ("<|audio_start|>", "<|audio_end|>", "<|audio_in|>", "<|pad|>")
IGNORE_INDEX = -100


@dataclass(frozen=True)
class UnifiedVocab:
    """Id arithmetic of the unified vocabulary. Pure integers: no tensors, no tokenizer."""

    text_vocab_size: int
    num_codebooks: int = 8
    codebook_size: int = 1024

    def __post_init__(self) -> None:
        if self.text_vocab_size <= 0 or self.num_codebooks <= 0 or self.codebook_size <= 0:
            raise ValueError(f"vocab sizes must be positive, got {self}")

    # --- specials -------------------------------------------------------------------------------
    def special_id(self, name: str) -> int:
        if name not in SPECIALS:
            raise KeyError(f"unknown special {name!r}; known: {SPECIALS}")
        return self.text_vocab_size + SPECIALS.index(name)

    @property
    def audio_start_id(self) -> int:
        return self.special_id("<|audio_start|>")

    @property
    def audio_end_id(self) -> int:
        return self.special_id("<|audio_end|>")

    @property
    def audio_in_id(self) -> int:
        """Placeholder for one frame of encoder output (audio understanding input)."""
        return self.special_id("<|audio_in|>")

    @property
    def pad_id(self) -> int:
        """Text-stream pad (CFG condition dropout, batch padding)."""
        return self.special_id("<|pad|>")

    # --- audio ----------------------------------------------------------------------------------
    @property
    def audio_offset(self) -> int:
        return self.text_vocab_size + len(SPECIALS)

    @property
    def codebook_span(self) -> int:
        """Ids per codebook: the codes plus one pad."""
        return self.codebook_size + 1

    @property
    def size(self) -> int:
        return self.audio_offset + self.num_codebooks * self.codebook_span

    def codebook_start(self, n: int) -> int:
        return self.audio_offset + n * self.codebook_span

    def audio_pad_id(self, n: int) -> int:
        return self.codebook_start(n) + self.codebook_size

    def audio_pad_ids(self) -> torch.Tensor:
        """[num_codebooks] pad id of each codebook."""
        return torch.tensor([self.audio_pad_id(n) for n in range(self.num_codebooks)], dtype=torch.long)

    def codes_to_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [..., num_codebooks] in [0, codebook_size] (codebook_size = pad) -> unified ids."""
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size}] ({self.codebook_size} = pad)")
        starts = torch.arange(self.num_codebooks, device=codes.device) * self.codebook_span + self.audio_offset
        return codes.long() + starts

    def ids_to_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """Inverse of codes_to_ids; raises if an id is not in its stream's codebook."""
        starts = torch.arange(self.num_codebooks, device=ids.device) * self.codebook_span + self.audio_offset
        codes = ids.long() - starts
        if bool(((codes < 0) | (codes > self.codebook_size)).any()):
            raise ValueError("ids outside their stream's codebook range")
        return codes

    def text_position_streams(self, text_id: int) -> list[int]:
        """The 8 stream ids of a text position: the text id on stream 0, codebook pads elsewhere."""
        return [text_id] + [self.audio_pad_id(n) for n in range(1, self.num_codebooks)]
