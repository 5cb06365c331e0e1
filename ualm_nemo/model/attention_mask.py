"""The attention mask of packed rows on the local spec: each packed sample sees only itself, causally.

Built from the rows' ``segment_ids`` (data/batching.py packs them); the THD form of the same rule, for
Transformer Engine, is model/packed_seq.py. Model code, inference and the data pipeline all take it from here::

    segment_ids  0 0 0 1 1 -1        mask (True = masked), row = query, column = key
                                     q0  . X X X X X
                                     q1  . . X X X X
                                     q2  . . . X X X
                                     q3  X X X . X X
                                     q4  X X X . . X
                                     q5  X X X X X .      padding attends to itself only (no all-masked row)
"""

from __future__ import annotations

import torch


def packed_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """segment_ids [B, S] (int, -1 = padding) -> BoolTensor [B, 1, S, S], True where attention is masked.

    Megatron's convention: ``attention_mask[b, 0, q, k]`` True means query q must not see key k. A query sees the
    keys of its own segment at or before it; a padding position sees only itself.
    """
    if segment_ids.dim() != 2:
        raise ValueError(f"segment_ids must be [B, S], got {tuple(segment_ids.shape)}")
    s = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, S(q), S(k)]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()  # k <= q
    real = (segment_ids >= 0)[:, :, None]
    eye = torch.eye(s, dtype=torch.bool, device=segment_ids.device)
    allowed = (same & causal & real) | eye
    return ~allowed[:, None]
