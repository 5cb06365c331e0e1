r"""Packed rows as Transformer Engine THD sequences: ``segment_ids`` [b, s] -> megatron ``PackedSeqParams``.

The local spec keeps packed samples apart with a block-causal mask (``model/attention_mask.packed_attention_mask``).
Transformer Engine's fused attention takes no such mask; it takes THD input instead: batch size 1, every token
of the micro-batch in one line ``[t, 1, h]``, and ``cu_seqlens`` marking where each sequence starts. The rule:

* the rows are laid end to end in row-major order, ``t = b * s`` (token ``(r, j)`` lands at ``r * s + j``):
  tokens / labels / loss_weights ``[b, s, ...]`` become ``[1, b * s, ...]`` (a view), so the embedding, the
  audio splice (placeholders stay in row-major order) and the heads run unchanged on a batch of one row;
* every maximal run of one segment id inside a row is one sequence (a row start always starts one, so equal
  ids in two rows stay apart); a run of padding (-1) is a sequence of its own;
* attention is causal inside each sequence, and RoPE restarts at 0 at every ``cu_seqlens`` boundary (megatron's
  THD rope), which is where the packer restarts ``position_ids`` (checked).

::

    segment_ids  row 0:  0 0 0 1 1 -1        cu_seqlens  [0, 3, 5, 6, 10, 12]
                 row 1:  0 0 0 0 1 1         max_seqlen  4

Padding convention: the mask path lets a padding position see only itself; here a run of padding is one causal
sequence, so a padding position also sees the padding before it in its row. Padding never sees a real token
and is never seen by one, and it carries no loss, so the loss of every real position is the same on both paths.
(One sequence per padding token would match the mask exactly, but megatron's unfused THD rope loops over the
sequences in Python, in every layer.) ``cu_seqlens_q_padded`` is not used: every token is in a sequence.
"""

from __future__ import annotations

import torch
from megatron.core.packed_seq_params import PackedSeqParams


def run_starts(segment_ids: torch.Tensor) -> torch.Tensor:
    """segment_ids [b, s] -> BoolTensor [b, s], True where a THD sequence starts (a row start or an id change)."""
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return starts


def check_segments(segment_ids: torch.Tensor) -> None:
    """Refuse segment ids the THD rule cannot express: a sample (id >= 0) split into several runs of a row."""
    if segment_ids.dim() != 2 or segment_ids.shape[1] == 0:
        raise ValueError(f"segment_ids must be [b, s] with s > 0, got {tuple(segment_ids.shape)}")
    if segment_ids.dtype.is_floating_point or bool((segment_ids < -1).any()):
        raise ValueError("segment_ids must be integers >= -1 (-1 = padding)")
    real = segment_ids >= 0
    runs = (run_starts(segment_ids) & real).sum(1)  # [b] real runs per row
    ids = segment_ids.sort(dim=1).values
    distinct = ((ids >= 0) & run_starts(ids)).sum(1)  # [b] distinct real ids per row
    bad = (runs != distinct).nonzero()
    if bad.numel():
        row = int(bad[0, 0])
        raise ValueError(f"segment_ids row {row} splits a sample into several runs ({segment_ids[row].tolist()}): "
                         "THD packing needs each sample contiguous; use model.parallel.transformer_impl=local")


def packed_seq_params(segment_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> PackedSeqParams:
    """segment_ids [b, s] (-1 = padding) -> THD ``PackedSeqParams`` of the rows laid end to end (module doc).

    cu_seqlens int32 [n + 1] on the ids' device (n sequences, ``cu_seqlens[-1] == b * s``), q and kv the same
    (self-attention); max_seqlen a Python int. ``position_ids`` [b, s], when given, must restart at 0 at every
    sequence start on the real positions (that is what THD rope applies); anything else is refused.
    """
    check_segments(segment_ids)
    starts = run_starts(segment_ids).reshape(-1)  # [t]
    t = starts.numel()
    offsets = starts.nonzero().squeeze(1)  # [n]
    cu_seqlens = torch.cat([offsets, offsets.new_tensor([t])]).to(torch.int32)
    if position_ids is not None:
        expected = torch.arange(t, device=offsets.device) - offsets[starts.long().cumsum(0) - 1]
        real = segment_ids.reshape(-1) >= 0
        if not torch.equal(position_ids.reshape(-1)[real].to(expected.dtype), expected[real]):
            raise ValueError("position_ids must restart at 0 at the start of every sample of a packed row (THD "
                             "rope restarts there); use model.parallel.transformer_impl=local for other positions")
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen)


def flatten_rows(x: torch.Tensor | None) -> torch.Tensor | None:
    """[b, s, ...] -> [1, b * s, ...] in row-major order (the THD token order); None stays None."""
    return None if x is None else x.reshape(1, x.shape[0] * x.shape[1], *x.shape[2:])


def unflatten_rows(x, rows: tuple[int, int]):
    """[1, b * s, ...] -> [b, s, ...], the inverse of ``flatten_rows``; tuples element-wise (the logits pair)."""
    if isinstance(x, tuple):
        return tuple(unflatten_rows(y, rows) for y in x)
    return x.reshape(*rows, *x.shape[2:])

