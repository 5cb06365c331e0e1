"""TTA reports: ``report.json`` (every figure, counts, per-item scores, protocols, metric-model checksums),
``report.md`` (rows = CFG scale / checkpoint / ground truth, columns = metrics, as the paper's tables) and
``metric_vs_cfg.png`` (one panel per metric) when matplotlib is installed and the run swept CFG scales."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

import soundfile

COLUMNS = (("fd_openl3", "FD_openl3 ↓"), ("kl_passt", "KL_passt ↓"), ("is_panns", "IS_panns ↑"),
           ("fd_panns", "FD_panns ↓"), ("clap", "CLAP ↑"), ("aes_CE", "CE ↑"), ("aes_CU", "CU ↑"),
           ("aes_PC", "PC ↑"), ("aes_PQ", "PQ ↑"))


def _cell(value: Any, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def clip_format(paths: Iterable[Path | str | None]) -> dict[str, Any]:
    """The sample rate(s) and channel count(s) of the readable clips among ``paths`` (what a row scored: the
    metrics resample each clip to their own rate): {"sample_rate": int or sorted list, "channels": ...}."""
    rates, channels = set(), set()
    for path in paths:
        try:
            info = soundfile.info(str(path)) if path is not None else None
        except (OSError, RuntimeError):  # soundfile.LibsndfileError is a RuntimeError
            info = None  # an unreadable clip is counted by the scoring (row["unreadable"])
        if info is not None:
            rates.add(info.samplerate)
            channels.add(info.channels)

    def one_or_all(values: set[int]) -> int | list[int] | None:
        return next(iter(values)) if len(values) == 1 else sorted(values) or None

    return {"sample_rate": one_or_all(rates), "channels": one_or_all(channels)}


def _audio_cell(audio: dict[str, Any] | None) -> str:
    """'48 kHz, 2 ch' (mixed values listed)."""
    if not audio or audio.get("sample_rate") is None:
        return "–"
    rate, ch = audio["sample_rate"], audio["channels"]
    rates = "/".join(f"{r / 1000:g}" for r in (rate if isinstance(rate, list) else [rate]))
    return f"{rates} kHz, {'/'.join(map(str, ch if isinstance(ch, list) else [ch]))} ch"


def markdown(rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    present = [(k, title) for k, title in COLUMNS if any(k in r["metrics"] for r in rows)]
    enhanced = f" Generated through the enhancer `{meta['enhancer']}`." if meta.get("enhancer") else ""
    lines = ["# Text-to-audio evaluation", "",
             f"eval set `{meta.get('data')}`; {meta.get('items')} items; metrics {', '.join(meta['metrics'])}."
             f"{enhanced} Audio: the clips' rate and channels as scored (each metric resamples to its own).", "",
             "| " + " | ".join(["row", "audio"] + [t for _, t in present] + ["clips scored / total"]) + " |",
             "|" + "---|" * (len(present) + 3)]
    for row in rows:
        scored = row["clips"] - len(row["unreadable"])
        cells = [_cell(row["metrics"].get(k)) for k, _ in present]
        lines.append("| " + " | ".join([row["name"], _audio_cell(row.get("audio"))] + cells
                                       + [f"{scored} / {row['clips']}"]) + " |")
    lines.append("")
    for row in rows:
        if row["unreadable"] or row["reference_unreadable"]:
            lines.append(f"- {row['name']}: {len(row['unreadable'])} generated and {len(row['reference_unreadable'])}"
                         " reference clips unreadable (listed in report.json), left out of every figure.")
    lines += ["", "Counts per figure, per-item scores, protocols and metric-model sha256: report.json.", ""]
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Metric vs CFG scale, one panel per metric; None (and a printed line) without matplotlib."""
    swept = [r for r in rows if r.get("cfg") is not None]
    if not swept:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no metric-vs-CFG plot (pip install matplotlib)")
        return None
    keys = [(k, t) for k, t in COLUMNS if any(r["metrics"].get(k) is not None for r in swept)]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.0), squeeze=False)
    for ax, (key, title) in zip(axes[0], keys):
        points = sorted((r["cfg"], r["metrics"][key]) for r in swept if r["metrics"].get(key) is not None)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        ax.set_title(title)
        ax.set_xlabel("CFG scale")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write(rows: Sequence[dict[str, Any]], meta: dict[str, Any], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    json_path.write_text(json.dumps({**meta, "rows": list(rows)}, indent=2, ensure_ascii=False))
    md_path.write_text(markdown(rows, meta))
    written = [json_path, md_path]
    png = plot(rows, out_dir / "metric_vs_cfg.png")
    return written + ([png] if png else [])
