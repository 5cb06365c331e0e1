"""Text-to-audio into a resumable job folder: the one loop behind ``examples/generate.py`` and
``examples/evaluate.py tta``, so a clip is written, recorded and resumed the same way by both.

A reply without audio (the model stopped before an audio segment) is a recorded skip, not a crash mid-run: the
manifest line says why, the summary counts it, and the TTA scorer counts it as a clip that cannot be scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from ualm_nemo.inference.engine import GenerationConfig
from ualm_nemo.inference.jobs import Item, OutputFolder

# the sampling settings that make a clip: recorded in every manifest line, so a rerun into the same folder with
# other values is a conflict rather than a silent mix
TTA_SETTINGS = ("cfg_scale", "temperature", "top_k", "max_frames", "min_frames")


def tta_settings(cfg: GenerationConfig) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in TTA_SETTINGS}


@dataclass
class ClipCounts:
    written: int = 0
    no_audio: int = 0  # replies without an audio segment, recorded as skipped lines
    refused: int = 0  # captions the input checks refused (pipeline.InputRejected: the context rule), skipped lines


def generate_clips(infer, cfg: GenerationConfig, folder: OutputFolder, todo: Sequence[Item], batch_size: int,
                   progress: bool = True, desc: str = "generating") -> ClipCounts:
    """Decode ``todo`` ``batch_size`` items at a time (an item gives the same audio alone or in any batch); each
    item's wav and manifest line are written as soon as its batch is done. A caption the input checks refuse is
    recorded as a skipped line with the reason (the rest of the batch goes on)."""
    from tqdm import tqdm

    from ualm_nemo.inference.pipeline import InputRejected

    counts = ClipCounts()
    with tqdm(total=len(todo), desc=desc, unit="clip", disable=not progress) as bar:
        for start in range(0, len(todo), batch_size):
            chunk, kept, requests = todo[start:start + batch_size], [], []
            for item in chunk:
                try:
                    requests.append(infer.prepare([("user", [item.caption])], "audio", item.seed, cfg))
                    kept.append(item)
                except InputRejected as err:
                    folder.add(item, frames=0, skipped=f"refused: {err}")
                    counts.refused += 1
            for item, reply in zip(kept, infer.decode(requests, cfg) if requests else []):
                if not reply.audio:
                    folder.add(item, frames=0, skipped=f"no audio (stop={reply.stop!r})")
                    counts.no_audio += 1
                    continue
                audio = reply.audio[0]
                folder.add(item, audio.wav, audio.sample_rate, frames=int(audio.codes.shape[0]))
                counts.written += 1
            bar.update(len(chunk))
    return counts
