"""Enhance generated audio: 16 kHz mono -> 48 kHz stereo, chunked with overlap-add for any length, batched.

Long audio is cut into ``chunk_seconds`` pieces overlapping by ``overlap_seconds`` (whole 20 ms latent frames);
each output piece is weighted by linear ramps over the overlaps (normalised by the summed weights), so the seams
blend two estimates of the same audio instead of meeting at an edge; the last piece ends at the audio's end, so
no piece sees padding the unchunked model would not see. Audio no longer
than one chunk is enhanced in one piece (exactly the unchunked result).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ualm_nemo.enhance.config import INPUT_RATE, OUTPUT_RATE
from ualm_nemo.enhance.export import CONFIG, FORMAT, WEIGHTS, _checkpoint_file  # same package: its run lookup
from ualm_nemo.enhance.model import UPSAMPLE, EnhancementVAE


def _ramp_weights(length: int, fade: int, first: bool, last: bool) -> torch.Tensor:
    w = torch.ones(length)
    if fade:
        up = (torch.arange(fade) + 0.5) / fade
        if not first:
            w[:fade] = up
        if not last:
            w[-fade:] = 1 - up
    return w


class Enhancer:
    """An :class:`~ualm_nemo.inference.postprocess.AudioPostProcessor`: ``enhancer(wav_16k) -> [2, 3 n]``."""

    sample_rate = OUTPUT_RATE

    def __init__(self, model: EnhancementVAE, chunk_seconds: float = 10.0, overlap_seconds: float = 1.0,
                 batch_size: int = 8, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        hop = model.config.hop
        self.chunk = int(round(chunk_seconds * INPUT_RATE / hop)) * hop
        self.overlap = int(round(overlap_seconds * INPUT_RATE / hop)) * hop
        if self.chunk <= 0 or not 0 <= self.overlap < self.chunk or batch_size < 1:
            raise ValueError(f"chunk_seconds={chunk_seconds} must hold at least one 20 ms frame, overlap_seconds="
                             f"{overlap_seconds} must be shorter than it, batch_size={batch_size} >= 1")
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.dtype = dtype or torch.float32
        self.model = model.to(self.device, self.dtype).eval()
        self.channels = model.config.out_channels

    @torch.no_grad()
    def _run(self, pieces: torch.Tensor) -> torch.Tensor:
        outs = [self.model.enhance(pieces[i:i + self.batch_size].to(self.device, self.dtype)).float().cpu()
                for i in range(0, pieces.shape[0], self.batch_size)]
        return torch.cat(outs)

    def enhance(self, wavs: torch.Tensor) -> torch.Tensor:
        """[B, 1, n] (or [B, n]) at 16 kHz -> [B, channels, 3 n] at 48 kHz."""
        if wavs.dim() == 2:
            wavs = wavs[:, None]
        if wavs.dim() != 3 or wavs.shape[1] != 1:
            raise ValueError(f"enhance takes 16 kHz mono [batch, 1, samples]; got {tuple(wavs.shape)}")
        if not torch.isfinite(wavs).all():
            raise ValueError("enhance: the input holds NaN or infinite samples")
        b, _, n = wavs.shape
        if n <= self.chunk:
            return self._run(wavs)
        step = self.chunk - self.overlap
        starts = list(range(0, n - self.chunk, step)) + [n - self.chunk]  # the last piece ends at n: no padding
        pieces = torch.stack([wavs[..., s:s + self.chunk] for s in starts], 1)  # [B, K, 1, chunk]
        out_pieces = self._run(pieces.flatten(0, 1)).unflatten(0, (b, len(starts)))  # [B, K, C, 3 chunk]
        out = torch.zeros(b, self.channels, n * UPSAMPLE)
        total = torch.zeros(n * UPSAMPLE)
        fade = self.overlap * UPSAMPLE
        for k, s in enumerate(starts):
            w = _ramp_weights(self.chunk * UPSAMPLE, fade, k == 0, k == len(starts) - 1)
            out[..., s * UPSAMPLE:(s + self.chunk) * UPSAMPLE] += out_pieces[:, k] * w
            total[s * UPSAMPLE:(s + self.chunk) * UPSAMPLE] += w
        return out / total  # the weights sum to one where overlaps are regular; the last, longer one is normalised

    def __call__(self, wav: torch.Tensor) -> torch.Tensor:
        """[n] at 16 kHz -> [channels, 3 n] at 48 kHz."""
        return self.enhance(wav.reshape(1, 1, -1))[0]

    @classmethod
    def from_pretrained(cls, path, **kw) -> "Enhancer":
        from ualm_nemo.enhance.export import load_enhancer
        return cls(load_enhancer(path), **kw)


def check_enhancer(path: str | Path) -> None:
    """Whether ``path`` looks loadable by ``Enhancer.from_pretrained`` without reading any weights (a launch-time
    check: the launcher runs it on the login node): FileNotFoundError / ValueError saying what is wrong."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"enhancer {path}: no such file or folder")
    if not (path / CONFIG).is_file():
        _checkpoint_file(path)  # an enhancer run, its checkpoints/ or one iter_*.ckpt
        return
    try:
        meta = json.loads((path / CONFIG).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path / CONFIG}: unreadable ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path / CONFIG}: not an enhancer config (format {meta.get('format')!r})"
                         if isinstance(meta, dict) else f"{path / CONFIG}: not an enhancer config")
    if not (path / WEIGHTS).is_file():
        raise FileNotFoundError(f"enhancer {path}: {CONFIG} without {WEIGHTS} (export it again)")
