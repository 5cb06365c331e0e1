"""Score the enhancer on a held-out set against the baseline (sinc resampling, the channel duplicated).

Each clip: target = the clip at 48 kHz stereo (first ``max_seconds``), input = its 16 kHz down-mix (optionally
through the X-Codec round trip, as generated audio is); both the enhancer's and the baseline's outputs are scored
with :func:`ualm_nemo.enhance.metrics.all_metrics`. Unreadable, silent, clipped or non-finite clips are counted
and listed, never silently dropped from the denominator.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from ualm_nemo.enhance.config import OUTPUT_RATE
from ualm_nemo.enhance.data import ClipSet, content_problem, to_input, to_target
from ualm_nemo.enhance.metrics import all_metrics
from ualm_nemo.enhance.baseline import SincResampler

METRICS = ("lsd", "lsd_high", "mrstft", "low_band_lsd", "low_band_snr_db")


def evaluate(enhancer: Callable[[torch.Tensor], torch.Tensor], clips: ClipSet, max_seconds: float | None = 10.0,
             codec: Callable[[torch.Tensor], torch.Tensor] | None = None, progress: bool = True) -> dict:
    baseline = SincResampler(OUTPUT_RATE, 2)
    items, skipped = [], [{"id": where, "reason": reason} for where, reason in clips.rejected]
    for cut in tqdm(clips.cuts, desc="evaluating", unit="clip", disable=not progress):
        piece = cut.truncate(duration=min(max_seconds, cut.duration)) if max_seconds else cut
        try:
            target = to_target(piece.load_audio(), cut.sampling_rate)
        except Exception as err:
            skipped.append({"id": cut.id, "reason": f"unreadable ({type(err).__name__}: {err})"})
            continue
        target = target[..., : target.shape[-1] // 3 * 3]
        problem = content_problem(target)
        if problem is not None:
            skipped.append({"id": cut.id, "reason": problem})
            continue
        inputs = to_input(target)
        if codec is not None:
            inputs = codec(inputs[None])[0]
        enhanced, plain = enhancer(inputs[0]), baseline(inputs[0])
        items.append({"id": cut.id, "seconds": target.shape[-1] / OUTPUT_RATE,
                      "enhancer": all_metrics(target, enhanced, inputs),
                      "baseline": all_metrics(target, plain, inputs)})
    summary = {system: {m: sum(i[system][m] for i in items) / len(items) for m in METRICS} if items else {}
               for system in ("enhancer", "baseline")}
    return {"clips": len(items), "skipped": len(skipped), "skipped_items": skipped, **summary, "items": items}


def write_report(report: dict, out_dir: str | Path, settings: dict) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    json_path.write_text(json.dumps({"settings": settings, **report}, indent=2) + "\n")
    lines = [f"Enhancer evaluation: {report['clips']} clips scored, {report['skipped']} skipped", "",
             "| system | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for system in ("enhancer", "baseline"):
        values = report.get(system) or {}
        lines.append(f"| {system} | " + " | ".join(f"{values[m]:.3f}" if m in values else "-" for m in METRICS)
                     + " |")
    lines += ["", "lsd / lsd_high: log-spectral distance, full band / above 8 kHz (lower is better); mrstft: "
              "MR-STFT distance; low_band_*: the output down-mixed to 16 kHz against the input."]
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path
