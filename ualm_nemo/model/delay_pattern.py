"""Delay pattern (MusicGen): stream n is shifted right by n frames so one LM step emits all codebooks.

Example, 3 codebooks, 4 frames (``a``/``b``/``c`` codes, ``.`` pad)::

    codes [T=4, N=3]       delayed [T+N-1=6, N]
    a0 b0 c0               a0 .  .
    a1 b1 c1       ->      a1 b0 .
    a2 b2 c2               a2 b1 c0
    a3 b3 c3               a3 b2 c1
                           .  b3 c2
                           .  .  c3

The inverse takes ``delayed[n:n+T, n]``. Both directions are one gather, no loop over frames.
"""

from __future__ import annotations

import torch


def _delay_index(num_frames: int, num_streams: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Source frame index [T+N-1, N] and validity mask for the delayed grid."""
    out_t = torch.arange(num_frames + num_streams - 1, device=device)[:, None]
    stream = torch.arange(num_streams, device=device)[None, :]
    src = out_t - stream  # frame of codes that lands at (out_t, stream)
    valid = (src >= 0) & (src < num_frames)
    return src.clamp(0, max(num_frames - 1, 0)), valid


def apply_delay(codes: torch.Tensor, pad: torch.Tensor | int) -> torch.Tensor:
    """codes [T, N] -> delayed [T+N-1, N]; ``pad`` is a scalar or a per-stream [N] tensor."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be [T, N], got {tuple(codes.shape)}")
    num_frames, num_streams = codes.shape
    src, valid = _delay_index(num_frames, num_streams, codes.device)
    if num_frames == 0:
        gathered = codes.new_zeros(src.shape)
    else:
        gathered = torch.gather(codes, 0, src)
    pad_grid = torch.as_tensor(pad, dtype=codes.dtype, device=codes.device).expand_as(gathered)
    return torch.where(valid, gathered, pad_grid)


def delay_pad_mask(frame: int, num_frames: int | None, num_streams: int) -> torch.Tensor:
    """[N] bool: which streams hold a pad at row ``frame`` of the delayed grid (``apply_delay``'s pads).

    ``num_frames`` is T, or None while it is still unknown (decoding, before stream 0 has ended the audio):
    then only the leading pads (``frame < n``) are known.
    """
    stream = torch.arange(num_streams)
    forced = stream > frame
    if num_frames is not None:
        forced |= frame >= num_frames + stream
    return forced


def revert_delay(delayed: torch.Tensor) -> torch.Tensor:
    """delayed [T+N-1, N] -> codes [T, N], taking delayed[n:n+T, n] for each stream n."""
    if delayed.dim() != 2:
        raise ValueError(f"delayed must be [T+N-1, N], got {tuple(delayed.shape)}")
    num_streams = delayed.shape[1]
    num_frames = delayed.shape[0] - num_streams + 1
    if num_frames < 0:
        raise ValueError(f"delayed grid of {delayed.shape[0]} frames is shorter than {num_streams - 1} delays")
    t = torch.arange(num_frames, device=delayed.device)[:, None] + torch.arange(num_streams, device=delayed.device)
    return torch.gather(delayed, 0, t)
