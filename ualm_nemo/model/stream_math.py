"""The 8-stream embedding and the stream heads, written once, single-device.

These are the reference math of UALM's input and output layers. The transformers-side class
(``inference/hf_model.py``) computes with them directly; the Megatron modules (``embedding.py``, ``heads.py``)
compute the same thing sharded over tensor-parallel ranks, and the TP tests check them against these functions
on the gathered weights.

Shapes: ``b`` batch, ``s`` positions, ``N`` streams (codebooks), ``h`` hidden, ``V`` unified vocabulary,
``span`` = codebook size + 1 (the codebook's pad).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F


class IdTable(NamedTuple):
    """Rows ``weight[i]`` embed unified id ``first_id + i``, for ids in [first_id, end_id) only.

    ``end_id`` matters where a table carries padding rows past its last real id (Megatron pads tables to a
    multiple of 128 x TP): those rows must not catch the ids of the next table.
    """

    weight: torch.Tensor  # [rows, h]
    first_id: int
    end_id: int


def lookup(table: IdTable, ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """ids, keep [...] -> [..., h]: each id's row where it falls in ``table`` and ``keep`` holds, else zeros."""
    local = ids - table.first_id
    here = keep & (ids >= table.first_id) & (ids < table.end_id) & (local < table.weight.shape[0])
    rows = F.embedding(local.masked_fill(~here, 0), table.weight)
    return rows * here.unsqueeze(-1).to(rows.dtype)


def embed_streams(tokens: torch.Tensor, tables: Sequence[IdTable], pad_ids: torch.Tensor) -> torch.Tensor:
    """tokens [b, s, N] (unified ids) -> [b, s, h]: the sum over streams (in stream order) of each id's row.

    A codebook pad (``pad_ids`` [N], one per stream) embeds to zero, so a text position (its text id on stream 0,
    pads elsewhere) embeds as its text row alone. An id may live in any of ``tables`` (they do not overlap).
    Each table is looked up once for all N streams ([b, s, N, h]), so the backward builds one dense gradient per
    table, not one per stream and table (measured: 8 zero-filled [text rows, h] grads were ~3 % of a CPU step);
    the sums run in the same order as stream by stream, so the values are the same bits.
    """
    keep = ~torch.isin(tokens, pad_ids)
    per_stream = None  # [b, s, N, h]
    for table in tables:
        rows = lookup(table, tokens, keep)
        per_stream = rows if per_stream is None else per_stream + rows
    streams = per_stream.unbind(-2)  # one backward node (a stack), not N zero-filled select grads
    hidden = streams[0]
    for emb in streams[1:]:  # N streams, not positions
        hidden = hidden + emb
    return hidden


def stream0_logits(hidden: torch.Tensor, weights: Sequence[torch.Tensor | None],
                   skipped_rows: int = 0) -> torch.Tensor:
    """hidden [..., h] -> logits [..., V] over the whole unified vocabulary (text, specials, every codebook).

    ``weights``: the head's row blocks in unified-id order (e.g. text rows, special rows, audio rows), applied
    block by block so the full [V, h] head is never concatenated. A block given as None (``skipped_rows``
    rows) is not computed: its logits are -inf (decoding steps that read only the audio columns).
    """
    blocks = [F.linear(hidden, w) if w is not None else
              hidden.new_full((*hidden.shape[:-1], skipped_rows), float("-inf")) for w in weights]
    return torch.cat(blocks, dim=-1)


def codebook_logits(hidden: torch.Tensor, weights: torch.Tensor,
                    stream_embedding: torch.Tensor | None) -> torch.Tensor:
    """hidden [..., h] -> logits of streams 1..N-1 over their own codebook, [..., N-1, span].

    * shared head: ``weights`` [N-1, span, h] are the audio head's rows of codebooks 1..N-1, applied to
      ``h + stream_embedding[n-1]`` (a learned per-stream offset; stream 0 has none);
    * per-codebook heads (MusicGen): ``weights`` are the heads themselves, ``stream_embedding`` is None.
    """
    if stream_embedding is None:
        return torch.einsum("...h,nch->...nc", hidden, weights)
    per_stream = hidden.unsqueeze(-2) + stream_embedding  # [..., N-1, h]
    return torch.einsum("...nh,nch->...nc", per_stream, weights)


def shared_codebook_rows(audio_head: torch.Tensor, num_streams: int, span: int) -> torch.Tensor:
    """The audio head [N * span (+ padding), h] -> the rows of codebooks 1..N-1 as [N-1, span, h]."""
    return audio_head[span: num_streams * span].view(num_streams - 1, span, -1)
