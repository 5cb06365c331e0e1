"""Masking a few logit columns (vocabulary padding) in place, without copying the logits forward or backward.

A bias of -1e30 on those columns (``F.linear(x, w, bias)``) makes CPU addmm first copy the broadcast bias into
the whole [tokens, vocab] output; an autograd-tracked ``logits[..., a:b].fill_()`` clones the whole gradient in
backward (CopySlices). This function fills the column ranges in place and zeroes the same ranges of the incoming
gradient, the exact derivative of a constant: cost proportional to the padded columns only.
"""

from __future__ import annotations

import torch


def column_ranges(mask: torch.Tensor) -> tuple[tuple[int, int], ...]:
    """[columns] bool -> the (start, end) runs where it is True."""
    edges = torch.diff(mask.int(), prepend=torch.zeros(1, dtype=torch.int), append=torch.zeros(1, dtype=torch.int))
    starts, ends = (edges == 1).nonzero().flatten().tolist(), (edges == -1).nonzero().flatten().tolist()
    return tuple(zip(starts, ends))


class _FillColumns(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, ranges: tuple[tuple[int, int], ...], value: float) -> torch.Tensor:
        ctx.ranges = ranges
        for start, end in ranges:
            logits[..., start:end].fill_(value)
        ctx.mark_dirty(logits)
        return logits

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()  # a broadcast (stride-0) gradient cannot be written in place
        for start, end in ctx.ranges:  # the filled columns do not depend on the input
            grad[..., start:end] = 0
        return grad, None, None


def fill_columns_(logits: torch.Tensor, ranges: tuple[tuple[int, int], ...], value: float) -> torch.Tensor:
    """Set logits[..., start:end] = value for each range, in place (``logits`` must be a fresh matmul output that
    no other autograd node saved); returns ``logits``."""
    return _FillColumns.apply(logits, ranges, value) if ranges else logits
