"""How the decoding loop steps a model: prefill a left-padded batch, then one new position per row per step.

A backend returns, at the last position of every row, the stream-0 logits [R, V] and the codebook logits
[R, N-1, span]. Rows are left-padded (every row's newest position is the last slot); padding is masked out of
attention and each row's positions count from its own first real token, so a row computes as it would alone.

* :class:`HFBackend`: the transformers-side ``UALMForConditionalGeneration`` with its KV cache;
* :class:`RecomputeBackend`: any model given as a full-sequence function: the whole sequence every step,
  O(length) per step; the reference the cached paths are tested against;
* ``megatron_backend.MegatronBackend``: the Megatron model with megatron-core's static KV cache, under TP.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

import torch

Logits = tuple[torch.Tensor, torch.Tensor]  # stream-0 [R, V], codebooks [R, N-1, span]


class DecodeBackend(Protocol):
    def prefill(self, prompts: Sequence[torch.Tensor], audio_features: Sequence[Sequence[torch.Tensor]],
                text: bool = True) -> Logits:
        """prompts: one [L_r, N] per row; audio_features: per row, the log-mel [n_mel, frames] of each of its
        placeholder runs, in order. ``text=False``: no row reads the text columns of stream 0 this step (they
        may be left at -inf instead of computed: the text head is most of a small model's step)."""

    def step(self, ids: torch.Tensor, text: bool = True) -> Logits:
        """ids [R, 1, N]: the next position of every row."""

    def keep(self, rows: torch.Tensor) -> None:
        """Drop every row not in ``rows`` (slot indices, ascending): finished turns leave the batch."""


def left_pad(prompts: Sequence[torch.Tensor], pad_row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """prompts [L_r, N] -> (tokens [R, L, N] left-padded with ``pad_row``, valid [R, L] bool)."""
    length = max(p.shape[0] for p in prompts)
    tokens = pad_row.repeat(len(prompts), length, 1)
    valid = torch.zeros(len(prompts), length, dtype=torch.bool)
    for r, p in enumerate(prompts):
        tokens[r, length - p.shape[0]:] = p
        valid[r, length - p.shape[0]:] = True
    return tokens, valid


def positions(valid: torch.Tensor) -> torch.Tensor:
    """valid [R, L] -> position ids [R, L]: each row counts from its first real slot (padding: 0)."""
    return (valid.long().cumsum(-1) - 1).clamp(min=0)


def batch_features(per_row: Sequence[Sequence[torch.Tensor]]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Each row's log-mel clips [n_mel, F_i] -> (features [n, n_mel, F_max] zero-padded, lens [n]) in placeholder
    order (rows, then positions), or (None, None) without audio input."""
    clips = [clip for row in per_row for clip in row]
    if not clips:
        return None, None
    lens = torch.tensor([c.shape[-1] for c in clips])
    features = clips[0].new_zeros(len(clips), clips[0].shape[0], int(lens.max()))
    for i, clip in enumerate(clips):
        features[i, :, : clip.shape[-1]] = clip
    return features, lens


class HFBackend:
    """``UALMForConditionalGeneration`` with transformers' KV cache (one new position per step)."""

    def __init__(self, model) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.pad_row = torch.tensor(model.vocab.text_position_streams(model.vocab.pad_id))
        self.cache = self.valid = self.next_position = None

    def prefill(self, prompts: Sequence[torch.Tensor], audio_features: Sequence[Sequence[torch.Tensor]],
                text: bool = True) -> Logits:
        tokens, valid = left_pad(prompts, self.pad_row)
        features, lens = batch_features(audio_features)
        self.valid = valid.to(self.device)
        position_ids = positions(self.valid)
        self.next_position = position_ids[:, -1:] + 1  # [R, 1]: every row's next position (a counter, not a cumsum)
        stream0, codebooks, self.cache = self.model.decode(
            tokens.to(self.device), None, attention_mask=self.valid, position_ids=position_ids,
            audio_features=None if features is None else features.to(self.device),
            audio_feature_lens=None if lens is None else lens.to(self.device), text=text)
        return stream0, codebooks

    def step(self, ids: torch.Tensor, text: bool = True) -> Logits:
        self.valid = torch.cat([self.valid, self.valid.new_ones(self.valid.shape[0], 1)], dim=1)
        position, self.next_position = self.next_position, self.next_position + 1
        stream0, codebooks, self.cache = self.model.decode(ids.to(self.device), self.cache, attention_mask=self.valid,
                                                           position_ids=position, text=text)
        return stream0, codebooks

    def keep(self, rows: torch.Tensor) -> None:
        rows = rows.to(self.device)
        self.cache.batch_select_indices(rows)
        self.valid, self.next_position = self.valid[rows], self.next_position[rows]


FullForward = Callable[..., Logits]
"""(tokens [R, L, N], valid [R, L], position_ids [R, L], audio_features, audio_feature_lens) -> logits at every
position (stream-0 [R, L, V], codebooks [R, L, N-1, span])."""


class RecomputeBackend:
    """Runs ``forward`` over the whole sequence at every step (exact and simple; the reference)."""

    def __init__(self, forward: FullForward, pad_row: torch.Tensor, device: torch.device) -> None:
        self.forward, self.pad_row, self.device = forward, pad_row, device
        self.tokens = self.valid = None
        self.clips: list[Sequence[torch.Tensor]] = []

    def _run(self) -> Logits:
        features, lens = batch_features(self.clips)
        if features is not None:
            features, lens = features.to(self.device), lens.to(self.device)
        stream0, codebooks = self.forward(self.tokens, self.valid, positions(self.valid), features, lens)
        return stream0[:, -1], codebooks[:, -1]

    def prefill(self, prompts: Sequence[torch.Tensor], audio_features: Sequence[Sequence[torch.Tensor]],
                text: bool = True) -> Logits:
        tokens, valid = left_pad(prompts, self.pad_row)
        self.tokens, self.valid, self.clips = tokens.to(self.device), valid.to(self.device), list(audio_features)
        return self._run()

    def keep(self, rows: torch.Tensor) -> None:
        rows = rows.to(self.device)
        self.tokens, self.valid = self.tokens[rows], self.valid[rows]
        self.clips = [self.clips[int(r)] for r in rows]

    def step(self, ids: torch.Tensor, text: bool = True) -> Logits:  # always every column: the reference
        self.tokens = torch.cat([self.tokens, ids.to(self.device)], dim=1)
        self.valid = torch.cat([self.valid, self.valid.new_ones(self.valid.shape[0], 1)], dim=1)
        return self._run()


def hf_full_forward(model) -> FullForward:
    """The HF-side class as a :data:`FullForward`."""
    def forward(tokens, valid, position_ids, features, lens):
        return model(tokens, features, lens, attention_mask=valid, position_ids=position_ids)
    return forward
