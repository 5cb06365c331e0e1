r"""Token-budget batching (length bucketing) and sequence packing, as pure functions of sample lengths.

Bucketing (``bucket_batches``): sort by length, then cut greedily so that ``rows x longest row <= max_tokens``
(padding counted): similar lengths share a batch and a batch of short samples holds more of them.

Packing (``pack_rows`` + ``collate_packed``): several samples per row of ``seq_len`` positions (first-fit
decreasing). A packed batch is a ``microbatch.MicroBatch`` [B, S] with ``position_ids`` (restarting at 0 for
each sample; pads continue counting) and ``segment_ids`` (0, 1, ... per sample in the row; -1 on padding);
``tasks`` holds one task per *sample*, row-major (len >= B).

Labels never cross a sample boundary: a sample's last position has label IGNORE (formatting.py builds labels
inside a sample), and ``collate_packed`` checks it. Attention stays inside a sample through the model's
``model/attention_mask.packed_attention_mask(segment_ids)`` (or, on Transformer Engine, model/packed_seq.py).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from ualm_nemo.data.formatting import sample_clips
from ualm_nemo.data.microbatch import MicroBatch
from ualm_nemo.model.vocab import IGNORE_INDEX, UnifiedVocab


def bucket_batches(lengths: Sequence[int], max_tokens: int, max_rows: int | None = None,
                   pad_to_multiple: int = 1) -> list[list[int]]:
    """Index lists (ascending length) with ``len(batch) * padded longest <= max_tokens``; every index once."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = -(-lengths[i] // pad_to_multiple) * pad_to_multiple  # ascending: the newcomer is the longest
        if longest > max_tokens:
            raise ValueError(f"a sample of {lengths[i]} positions exceeds the token budget {max_tokens}")
        if current and ((len(current) + 1) * longest > max_tokens or (max_rows and len(current) >= max_rows)):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def pack_rows(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """First-fit decreasing: rows of sample indices whose lengths sum to <= seq_len; every index once."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[i] > seq_len:
            raise ValueError(f"a sample of {lengths[i]} positions does not fit a row of {seq_len}")
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(seq_len - lengths[i])
    return rows


def collate_packed(rows: Sequence[Sequence[Mapping[str, Any]]], vocab: UnifiedVocab, seq_len: int) -> MicroBatch:
    """Rows of samples -> one packed batch [B = len(rows), S = seq_len] (module docstring)."""
    flat = [s for row in rows for s in row]
    for s in flat:
        if int(s["labels"][-1].ne(IGNORE_INDEX).sum()):
            raise ValueError("a sample's last label must be IGNORE, or packing would learn across samples")
    batch = pad_rows(rows, vocab, seq_len)
    _check_placeholders(batch, vocab)
    return batch


def pad_rows(rows: Sequence[Sequence[Mapping[str, Any]]], vocab: UnifiedVocab, seq_len: int) -> MicroBatch:
    """The one padding rule of every collate function: each row's samples laid end to end from position 0, then
    <|pad|> tokens with IGNORE labels and zero weights up to ``seq_len``; position_ids restart at 0 per sample
    (padding continues the row's count), segment_ids 0, 1, ... per sample and -1 on padding; the samples' audio
    clips in row-major order, zero-padded to the longest; their tasks row-major. (An unpacked batch is rows of one
    sample each; ``dataset.collate`` then drops position_ids and segment_ids.)"""
    flat = [s for row in rows for s in row]
    b, streams = len(rows), flat[0]["tokens"].shape[1]
    pad_row = torch.tensor(vocab.text_position_streams(vocab.pad_id), dtype=torch.long)  # [8]
    tokens = pad_row.expand(b, seq_len, streams).clone()  # [B, S, 8]
    labels = torch.full((b, seq_len, streams), IGNORE_INDEX, dtype=torch.long)
    weights = torch.zeros(b, seq_len, streams, dtype=torch.float32)
    position_ids = torch.arange(seq_len).expand(b, seq_len).clone()
    segment_ids = torch.full((b, seq_len), -1, dtype=torch.long)
    lengths = torch.zeros(b, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for k, s in enumerate(row):
            n = s["tokens"].shape[0]
            if start + n > seq_len:
                raise ValueError(f"packed row {r} exceeds seq_len={seq_len}")
            sl = slice(start, start + n)
            tokens[r, sl], labels[r, sl], weights[r, sl] = s["tokens"], s["labels"], s["loss_weights"]
            position_ids[r, sl] = torch.arange(n)
            segment_ids[r, sl] = k
            start += n
        lengths[r] = start
    audio_features, audio_feature_lens = pad_clips([clip for s in flat for clip in sample_clips(s)])
    return MicroBatch(tokens=tokens, labels=labels, loss_weights=weights, lengths=lengths,
                      tasks=[s["task"] for s in flat], audio_features=audio_features,
                      audio_feature_lens=audio_feature_lens, position_ids=position_ids, segment_ids=segment_ids)


def pad_clips(clips: Sequence[torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Mel clips [mels, frames_i] -> ([clips, mels, max frames] zero-padded, [clips] frames), or (None, None)."""
    if not clips:
        return None, None
    lens = torch.tensor([c.shape[1] for c in clips], dtype=torch.long)
    features = torch.zeros(len(clips), clips[0].shape[0], int(lens.max()))
    for i, c in enumerate(clips):
        features[i, :, : c.shape[1]] = c
    return features, lens


def _check_placeholders(batch: MicroBatch, vocab: UnifiedVocab) -> None:
    from ualm_nemo.model.audio_frames import num_encoder_frames_from_mel

    placeholders = int((batch.tokens[..., 0] == vocab.audio_in_id).sum())
    lens = batch.audio_feature_lens
    frames = 0 if lens is None else sum(num_encoder_frames_from_mel(int(n)) for n in lens)
    if placeholders != frames:
        raise ValueError(f"packed batch has {placeholders} <|audio_in|> positions but features give {frames}")
