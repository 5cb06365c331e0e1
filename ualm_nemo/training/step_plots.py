"""Metric-vs-step plots of a run: one PNG per figure of ``validation.jsonl`` (``val_*``) and
``evaluation.jsonl`` (``eval_*``), the series the paper draws across pre-training (MMAU, CLAP, ...).

Only numeric figures that are plotted as series are drawn (losses, CLAP, FD, QA accuracies); counts such as
``tokens`` or ``qa_total`` are left out. matplotlib renders with the Agg backend (no display needed).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from ualm_nemo.training.validation import ValidationLog

LOGS = (("validation.jsonl", "val"), ("evaluation.jsonl", "eval"))
COUNTS = re.compile(r"^(tokens.*|tta_clips|tta_scored|qa_correct|qa_total)$")


def series(path: Path) -> dict[str, list[tuple[int, float]]]:
    """{figure: [(step, value), ...]} of one step log (nulls and non-numbers left out)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for line in ValidationLog(path.parent, path.name).read():
        for key, value in line.items():
            if key == "step" or COUNTS.match(key) or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                out.setdefault(key, []).append((int(line["step"]), float(value)))
    return out


def plot_steps(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write ``<out_dir>/{val,eval}_<figure>.png`` (default out_dir: ``<run_dir>/plots``); returns the files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "plots"
    found = [(run_dir / name, prefix) for name, prefix in LOGS if (run_dir / name).is_file()]
    if not found:
        raise FileNotFoundError(f"{run_dir}: no validation.jsonl or evaluation.jsonl (train.val_every_n_steps / "
                                "train.eval_every_n_steps write them)")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path, prefix in found:
        for key, points in sorted(series(path).items()):
            fig, ax = plt.subplots(figsize=(5.0, 3.2))
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3)
            ax.set_title(f"{prefix}/{key}")
            ax.set_xlabel("training step")
            ax.grid(alpha=0.3)
            fig.tight_layout()
            target = out_dir / f"{prefix}_{re.sub(r'[^A-Za-z0-9_.-]', '_', key)}.png"
            fig.savefig(target, dpi=100)
            plt.close(fig)
            written.append(target)
    return written
