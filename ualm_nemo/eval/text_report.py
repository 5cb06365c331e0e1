"""Text-benchmark reports: ``report.json`` (every figure with its count, rejected entries, the settings and file
checksums, lm_eval's versions and config, every item's output) and ``report.md`` (the paper's table: one row
per benchmark, then MMLU per subject)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def _err(value: float | None) -> str:
    return "" if value is None else f" ± {100 * value:.2f}"


def markdown(report: dict[str, Any]) -> str:
    s, f = report["settings"], report["figures"]
    lines = ["# Text benchmarks", "", f"model `{s['model']['path']}`; dtype {s['dtype']}; chat template "
             f"{'on' if s['chat_template'] else 'off'}" + (f"; first {s['limit']} items of each set only "
                                                           "(not a benchmark score)" if s["limit"] else "") + ".",
             "", "| benchmark | metric | score (%) | items | shots | rejected entries |", "|---|---|---|---|---|---|"]
    rejected = {k.split(".")[0]: len(v) for k, v in report["rejected"].items() if k.endswith(".test")}
    if "mmlu" in f:
        m = f["mmlu"]
        lines.append(f"| MMLU | acc (all questions) | {_pct(m['acc'])}{_err(m['acc_stderr'])} | {m['n']} | "
                     f"{s['mmlu_shots']} | {rejected.get('mmlu', 0)} |")
    if "gsm8k" in f:
        g = f["gsm8k"]
        for filt in ("strict-match", "flexible-extract"):
            lines.append(f"| GSM8K | exact match, {filt} | {_pct(g[filt])}{_err(g[f'{filt}_stderr'])} | {g['n']} | "
                         f"{s['gsm8k_shots']} | {rejected.get('gsm8k', 0)} |")
    if "humaneval" in f:
        h = f["humaneval"]
        score = _pct(h["pass@1"]) if h["executed"] else "not executed"
        lines.append(f"| HumanEval | pass@1 (greedy) | {score} | {h['n']} | 0 | – |")
    lines.append("")
    if "humaneval" in f and not f["humaneval"]["executed"]:
        lines += [f"HumanEval: {f['humaneval']['note']}.", ""]
    for key, entries in report["rejected"].items():
        if entries:
            lines.append(f"- {key}: {len(entries)} entries rejected, not scored (listed in report.json), e.g. "
                         f"{entries[0]['where']}: {entries[0]['reason']}")
    if "mmlu" in f and len(f["mmlu"]["subjects"]) > 1:
        lines += ["", "| MMLU subject | acc (%) | items |", "|---|---|---|"]
        lines += [f"| {subject} | {_pct(v['acc'])} | {v['n']} |" for subject, v in f["mmlu"]["subjects"].items()]
    versions = report.get("lm_eval", {})
    lines += ["", f"lm_eval {versions.get('lm_eval_version', '–')}, transformers "
              f"{versions.get('transformers_version', '–')}; settings, checksums and every item: report.json.", ""]
    return "\n".join(lines)


def write(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    json_path.write_text(json.dumps(report, indent=1, ensure_ascii=False, default=float))
    md_path.write_text(markdown(report), encoding="utf-8")
    return json_path, md_path
