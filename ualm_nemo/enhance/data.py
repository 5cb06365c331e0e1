"""Training pairs made on the fly from any-rate mono or stereo clips read through Lhotse.

target = the clip at 48 kHz stereo (mono duplicated); input = the target down-mixed and resampled to 16 kHz
(optionally passed through the X-Codec round trip by the trainer, so the model learns to undo codec artefacts).

Batches are a pure function of (seed, step): slot ``k`` of step ``s``'s global batch draws its (clip, offset) from
``numpy.random.default_rng([seed, s, k])``, weighted by clip duration, and rank ``r`` makes its contiguous slots. So a
resumed run sees exactly the batches it would have seen, and 2 ranks see together what 1 rank sees alone. A crop
that is non-finite, silent or clipped is replaced by the next draw of the same generator and counted.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torchaudio.functional as AF
from lhotse import CutSet, Recording, RecordingSet, load_manifest

from ualm_nemo.enhance.config import INPUT_RATE, OUTPUT_RATE

log = logging.getLogger(__name__)
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".opus")
SILENCE_PEAK = 1e-4  # about -80 dBFS: nothing to learn from
CLIPPED_SHARE = 0.01  # more than 1 % of samples at full scale


@dataclass
class ClipSet:
    cuts: list  # lhotse cuts, usable
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (where, reason)


def read_clips(source: str | Path, min_seconds: float = 0.1) -> ClipSet:
    """A folder of audio files, or a Lhotse recordings / cuts manifest -> usable cuts plus counted rejects."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"enhancer data {source}: no such file or folder")
    rejected: list[tuple[str, str]] = []
    if source.is_dir():
        recordings = []
        for path in sorted(p for p in source.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES):
            try:
                recordings.append(Recording.from_file(path, recording_id=str(path.relative_to(source))))
            except Exception as err:  # any unreadable header: a counted reject, never a crash mid-run
                detail = " ".join(str(err).split())[:300]  # lhotse's message spans lines: one line, bounded
                rejected.append((str(path), f"unreadable audio ({type(err).__name__}: {detail})"))
        cuts = [c.with_id(c.recording_id) for c in CutSet.from_manifests(
            recordings=RecordingSet.from_recordings(recordings))] if recordings else []
    else:
        manifest = load_manifest(source)
        cuts = list(CutSet.from_manifests(recordings=manifest) if isinstance(manifest, RecordingSet) else manifest)
    usable = []
    for cut in cuts:
        if cut.num_channels not in (1, 2):
            rejected.append((cut.id, f"{cut.num_channels} channels (mono or stereo only)"))
        elif not cut.duration >= min_seconds:
            rejected.append((cut.id, f"duration {cut.duration:.3f} s < {min_seconds} s"))
        else:
            usable.append(cut)
    return ClipSet(usable, rejected)


def to_target(audio: np.ndarray | torch.Tensor, sample_rate: int) -> torch.Tensor:
    """[C, T] (C = 1 or 2) at any rate -> [2, T'] at 48 kHz."""
    wav = torch.as_tensor(audio, dtype=torch.float32)
    if wav.dim() == 1:
        wav = wav[None]
    if wav.shape[0] not in (1, 2):
        raise ValueError(f"{wav.shape[0]} channels: mono or stereo only")
    if sample_rate != OUTPUT_RATE:
        wav = AF.resample(wav, sample_rate, OUTPUT_RATE)
    return wav.expand(2, -1).contiguous() if wav.shape[0] == 1 else wav


def to_input(target: torch.Tensor) -> torch.Tensor:
    """[..., 2, T] at 48 kHz -> [..., 1, T / 3] at 16 kHz: the down-mix, band-limited resampling."""
    return AF.resample(target.mean(-2, keepdim=True), OUTPUT_RATE, INPUT_RATE)


def content_problem(wav: torch.Tensor) -> str | None:
    """Why a crop must not be trained on (None when it is fine)."""
    if not torch.isfinite(wav).all():
        return "non-finite samples"
    peak = wav.abs().max().item()
    if peak < SILENCE_PEAK:
        return "silent"
    if (wav.abs() >= 0.999).float().mean().item() > CLIPPED_SHARE:
        return "clipped"
    return None


class PairBatches(torch.utils.data.IterableDataset):
    """This rank's batches from ``start_step`` on: {"input" [b, 1, n], "target" [b, 2, 3n], "step", "skipped"}.

    With DataLoader workers, worker ``w`` makes steps ``start + w, start + w + W, ...``; the loader's round-robin
    over workers then yields them in step order.
    """

    def __init__(self, clips: ClipSet, segment_seconds: float, global_batch: int, rank: int, world: int,
                 seed: int, start_step: int = 0, max_draws: int = 64) -> None:
        if not clips.cuts:
            raise ValueError("enhancer data: no usable clip")
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} is not divisible by {world} ranks")
        self.cuts = clips.cuts
        self.frames = int(round(segment_seconds * 50))
        if self.frames < 1:
            raise ValueError(f"segment_seconds={segment_seconds}: at least one 20 ms latent frame")
        self.samples = self.frames * OUTPUT_RATE // 50
        self.global_batch, self.rank, self.world = global_batch, rank, world
        self.seed, self.start_step, self.max_draws = seed, start_step, max_draws
        durations = np.array([c.duration for c in self.cuts], dtype=np.float64)
        self.weights = durations / durations.sum()

    def crop(self, index: int, rng: np.random.Generator) -> torch.Tensor:
        cut = self.cuts[index]
        seconds = self.samples / OUTPUT_RATE
        offset = float(rng.uniform(0.0, max(cut.duration - seconds, 0.0)))
        piece = cut.truncate(offset=offset, duration=min(seconds, cut.duration - offset), preserve_id=True)
        target = to_target(piece.load_audio(), cut.sampling_rate)[:, : self.samples]
        return torch.nn.functional.pad(target, (0, self.samples - target.shape[-1]))

    def batch(self, step: int) -> dict:
        targets, ids, skipped = [], [], Counter()
        per_rank = self.global_batch // self.world
        for slot in range(self.rank * per_rank, (self.rank + 1) * per_rank):
            rng = np.random.default_rng([self.seed, step, slot])  # one generator per slot: ranks never drift
            for _ in range(self.max_draws):
                index = int(rng.choice(len(self.cuts), p=self.weights))
                target = self.crop(index, rng)
                problem = content_problem(target)
                if problem is None:
                    targets.append(target)
                    ids.append(self.cuts[index].id)
                    break
                skipped[problem] += 1
                log.warning("enhancer data: skipped a crop of %s (%s)", self.cuts[index].id, problem)
            else:
                raise RuntimeError(f"enhancer data: {self.max_draws} draws in a row were unusable at step {step} "
                                   f"({dict(skipped)}); check the data")
        target = torch.stack(targets)
        return {"input": to_input(target), "target": target, "step": step, "ids": ids, "skipped": dict(skipped)}

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        step = self.start_step + worker
        while True:
            yield self.batch(step)
            step += workers
