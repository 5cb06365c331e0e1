"""MMLU and GSM8K on an exported HF folder through lm_eval 0.4.13, offline, from local JSON lines.

The exported folder's ``config.json`` + safetensors are a plain ``Qwen2ForCausalLM`` (text ids unchanged), so
lm_eval's ``hf`` model runs it as is. Task YAMLs are written into the run folder over our own checked copies of the
sets (``dataset_path: json``): MMLU as one task per subject with the built-in MMLU prompt ("<question>\\nA. ...
\\nAnswer:", the letter scored by log-likelihood, few-shot = the first k dev entries of the same subject) and a
group averaging over all questions (``weight_by_size``, as lm_eval's ``mmlu``); GSM8K as lm_eval's own
``gsm8k.yaml`` (included, prompt / stop strings / strict and flexible extraction unchanged) over the local file.
Every hub access is switched off in this module (``force_offline``) before lm_eval or datasets is imported.
Generated and scored answers are cached per request in ``<out>/cache`` (lm_eval's CachingLM, sqlite written as
each request ends): rerunning a killed run recomputes only what is missing.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Sequence

from ualm_nemo.eval.text_sets import TextSet

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_EVALUATE_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
MMLU_GROUP = "ualm_mmlu"
GSM8K_TASK = "ualm_gsm8k"


def force_offline() -> None:
    """No hub, ever: the env vars for libraries not yet imported, the constants of those already imported (they
    read the env once, at import)."""
    os.environ.update(OFFLINE_ENV)
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None:
        hub.HF_HUB_OFFLINE = True
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        datasets_config.HF_HUB_OFFLINE = datasets_config.HF_DATASETS_OFFLINE = True


def _task_name(subject: str) -> str:
    return f"{MMLU_GROUP}_" + (re.sub(r"[^0-9a-z]+", "_", subject.lower()).strip("_") or "x")


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path.resolve())


def _yaml(path: Path, config: dict[str, Any]) -> None:
    """JSON is YAML: lm_eval's loader reads it, and nothing in it needs quoting by hand."""
    path.write_text(json.dumps(config, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


# the built-in MMLU prompt for any number of choices (4 choices: the same string as lm_eval's mmlu template)
MMLU_PROMPT = ("{{question.strip()}}\n{% for c in choices %}{{letters[loop.index0]}}. {{c}}\n{% endfor %}Answer:")


def write_mmlu_tasks(test: TextSet, dev: TextSet | None, shots: int, task_dir: Path) -> dict[str, str]:
    """One lm_eval task per subject over ``task_dir/data`` copies, plus the group; -> {subject: task name}."""
    tasks: dict[str, str] = {}
    for item in test.items:
        tasks.setdefault(item["subject"], _task_name(item["subject"]))
    if len(set(tasks.values())) != len(tasks):
        raise ValueError(f"subjects {sorted(tasks)} collide once made task names: rename them")
    for subject, name in tasks.items():
        files = {"test": _write_jsonl(task_dir / "data" / f"{name}.test.jsonl",
                                      [i for i in test.items if i["subject"] == subject])}
        config: dict[str, Any] = {"task": name, "dataset_path": "json", "test_split": "test",
                                  "output_type": "multiple_choice", "doc_to_text": MMLU_PROMPT,
                                  "doc_to_choice": "letters", "doc_to_target": "answer", "num_fewshot": shots,
                                  "description": "The following are multiple choice questions (with answers) "
                                                 f"about {subject.replace('_', ' ')}.\n\n",
                                  "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
                                  "metadata": {"version": 1.0, "subject": subject}}
        if shots:
            files["dev"] = _write_jsonl(task_dir / "data" / f"{name}.dev.jsonl",
                                        [i for i in dev.items if i["subject"] == subject])
            config |= {"fewshot_split": "dev", "fewshot_config": {"sampler": "first_n"}}
        config["dataset_kwargs"] = {"data_files": files, "cache_dir": str((task_dir / "hf_datasets").resolve())}
        _yaml(task_dir / f"{name}.yaml", config)
    _yaml(task_dir / f"{MMLU_GROUP}.yaml", {"group": MMLU_GROUP, "task": sorted(tasks.values()),
                                            "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}],
                                            "metadata": {"version": 1.0}})
    return tasks


def builtin_gsm8k_yaml() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml"


def write_gsm8k_task(test: TextSet, train: TextSet | None, shots: int, task_dir: Path) -> str:
    """lm_eval's gsm8k.yaml (included) over the local test file; few-shot from the local train file."""
    files = {"test": _write_jsonl(task_dir / "data" / f"{GSM8K_TASK}.test.jsonl", test.items)}
    config: dict[str, Any] = {"include": str(builtin_gsm8k_yaml()), "task": GSM8K_TASK, "tag": [],
                              "dataset_path": "json", "dataset_name": None, "test_split": "test",
                              "training_split": None, "fewshot_split": None, "num_fewshot": shots}
    if shots:
        files["train"] = _write_jsonl(task_dir / "data" / f"{GSM8K_TASK}.train.jsonl", train.items)
        config |= {"training_split": "train", "fewshot_split": "train"}
    config["dataset_kwargs"] = {"data_files": files, "cache_dir": str((task_dir / "hf_datasets").resolve())}
    _yaml(task_dir / f"{GSM8K_TASK}.yaml", config)
    return GSM8K_TASK


def build_lm(hf_dir: str | Path, tokenizer: str | Path, dtype: str, batch_size: int, device: str,
             max_length: int | None = None):
    """lm_eval's ``hf`` model (``HFLM``) on the exported folder: AutoModelForCausalLM loads its Qwen2 part."""
    force_offline()
    from lm_eval.api.registry import get_model

    args: dict[str, Any] = {"pretrained": str(hf_dir), "tokenizer": str(tokenizer), "dtype": dtype,
                            "local_files_only": True}
    if max_length:
        args["max_length"] = max_length
    return get_model("hf").create_from_arg_obj(args, {"batch_size": batch_size, "device": device})


def evaluate(lm, task_names: Sequence[str], task_dir: Path, cache: Path | None, chat_template: bool = False,
             seed: int | None = None) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` on our tasks only (``include_defaults=False``: no other task is even read).
    ``seed`` None keeps lm_eval's own seeds (GSM8K's few-shot draw then matches a stock lm_eval run)."""
    force_offline()
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    seeds = {} if seed is None else {k: seed for k in ("random_seed", "numpy_random_seed", "torch_random_seed",
                                                       "fewshot_random_seed")}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
    return lm_eval.simple_evaluate(model=lm, tasks=list(task_names), task_manager=manager, log_samples=True,
                                   use_cache=str(cache) if cache is not None else None,
                                   apply_chat_template=chat_template, fewshot_as_multiturn=chat_template,
                                   **seeds)


def _metric(block: dict[str, Any], name: str) -> tuple[float | None, float | None]:
    value, err = block.get(name), block.get(name.replace(",", "_stderr,"))
    return (None if value is None else float(value)), (None if err in (None, "N/A") else float(err))


def mmlu_figures(results: dict[str, Any], tasks: dict[str, str]) -> dict[str, Any]:
    """Accuracy over all questions (the group) and per subject, each with its count."""
    per_subject, correct, total = {}, 0.0, 0
    for subject, name in sorted(tasks.items()):
        acc, err = _metric(results["results"][name], "acc,none")
        n = int(results["n-samples"][name]["effective"])
        per_subject[subject] = {"acc": acc, "acc_stderr": err, "n": n}
        correct, total = correct + acc * n, total + n
    acc, err = _metric(results["results"][MMLU_GROUP], "acc,none")
    return {"acc": acc, "acc_stderr": err, "n": total, "correct": round(correct), "subjects": per_subject}


def gsm8k_figures(results: dict[str, Any]) -> dict[str, Any]:
    block = results["results"][GSM8K_TASK]
    figures: dict[str, Any] = {"n": int(results["n-samples"][GSM8K_TASK]["effective"])}
    for filt in ("strict-match", "flexible-extract"):
        figures[filt], figures[f"{filt}_stderr"] = _metric(block, f"exact_match,{filt}")
    return figures


def samples(results: dict[str, Any], task: str) -> list[dict[str, Any]]:
    """Per item: id (file:line), target, the model's output(s) and the metrics, for report.json."""
    out = []
    for s in results.get("samples", {}).get(task, []):
        resps = s.get("filtered_resps")
        out.append({"id": s["doc"].get("id"), "filter": s.get("filter"), "target": s.get("target"),
                    "response": resps, **{m: s.get(m) for m in s.get("metrics", [])}})
    return out


def lm_eval_settings(results: dict[str, Any]) -> dict[str, Any]:
    """What lm_eval records of its own run: versions, task versions, shots, model info, config."""
    keep = ("lm_eval_version", "transformers_version", "versions", "n-shot", "config", "tokenizer_eos_token",
            "tokenizer_pad_token", "tokenizer_bos_token", "eot_token_id", "max_length", "date")
    return json.loads(json.dumps({k: results.get(k) for k in keep}, default=str))
