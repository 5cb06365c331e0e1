"""Text benchmarks (evaluate.py text) on the tiny exported UALM with a real byte-level tokenizer: lm_eval's MMLU
accuracy against log-likelihoods computed with transformers directly, GSM8K's extraction on scripted generations
through lm_eval's own pipeline, HumanEval executed only with the flag (canonical solutions pass, wrong code fails),
resume, and bad input -- all with every internet socket refused."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

from ualm_nemo.eval import humaneval, text_bench, text_suite
from ualm_nemo.testing.examples import load_example
from ualm_nemo.testing.hf_folders import write_byte_tokenizer


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every internet connection is refused and recorded; any attempt fails the test, even one that the library
    caught (local sockets, e.g. multiprocessing's, still work)."""
    connect, attempts = socket.socket.connect, []

    def guarded(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise OSError(f"network access attempted: {address}")
        return connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    yield
    assert not attempts, f"network access attempted: {attempts}"


@pytest.fixture(scope="module")
def model(tiny_export, tmp_path_factory) -> dict[str, Path]:
    return {"hf": tiny_export["hf"], "tok": write_byte_tokenizer(tmp_path_factory.mktemp("byte_tokenizer"))}


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _prompt(item: dict) -> str:
    """lm_eval's MMLU prompt (tasks/mmlu/default), written out by hand for the reference."""
    return item["question"].strip() + "\n" + "".join(f"{'ABCD'[i]}. {c}\n" for i, c in enumerate(item["choices"])) \
        + "Answer:"


def _direct_logliks(hf: Path, tok_dir: Path, context: str, letters: str) -> list[float]:
    """log p(" X" | context) for each letter X, by one transformers forward per choice."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    lm = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    ctx = tok.encode(context, add_special_tokens=False)
    out = []
    for letter in letters:
        cont = tok.encode(" " + letter, add_special_tokens=False)
        with torch.no_grad():
            logp = lm(torch.tensor([ctx + cont])).logits[0].float().log_softmax(-1)
        out.append(sum(float(logp[len(ctx) - 1 + i, c]) for i, c in enumerate(cont)))
    return out


def test_force_offline_overrides_an_online_setting(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    text_bench.force_offline()
    assert huggingface_hub.constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE
    assert all(__import__("os").environ[k] == "1" for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def test_mmlu_accuracy_equals_direct_loglikelihood(model, tmp_path):
    dev = [{"question": f"Example {s} question {k}?", "choices": ["yes", "no", "maybe", "never"], "answer": 2 - k,
            "subject": s} for k in (0, 1) for s in ("astronomy", "world_history")]
    items = [{"question": f"Q{i}: which {w}?", "choices": [f"c{i}", "blue", "red", "green"][: 3 if i == 5 else 4],
              "answer": 0, "subject": ("astronomy", "world_history")[i % 2]}
             for i, w in enumerate(["star", "king", "moon", "war", "sun", "treaty", "comet"])]
    letters = {i: "ABCD"[: len(it["choices"])] for i, it in enumerate(items)}
    reference = {}
    for i, it in enumerate(items):  # 1-shot: the subject's first dev entry (answer C), then the question
        shot = next(d for d in dev if d["subject"] == it["subject"])
        context = (f"The following are multiple choice questions (with answers) about "
                   f"{it['subject'].replace('_', ' ')}.\n\n{_prompt(shot)} C\n\n{_prompt(it)}")
        reference[i] = _direct_logliks(model["hf"], model["tok"], context, letters[i])
    for i, it in enumerate(items):  # right for even items, wrong for odd ones: the accuracy is known
        pred = max(range(len(letters[i])), key=lambda c: reference[i][c])
        it["answer"] = pred if i % 2 == 0 else (pred + 1) % len(letters[i])
    test = _jsonl(tmp_path / "mmlu.jsonl", items + [dict(items[0], answer=9)])  # answer out of range: rejected
    args = text_suite.TextSuiteArgs(hf=str(model["hf"]), tokenizer=str(model["tok"]), mmlu=str(test),
                                    mmlu_dev=str(_jsonl(tmp_path / "dev.jsonl", dev)), mmlu_shots=1,
                                    dtype="float32", batch_size=3, out_dir=str(tmp_path / "out"), progress=False)
    report = text_suite.run(args)
    mmlu = report["figures"]["mmlu"]
    assert mmlu["n"] == 7 and mmlu["correct"] == 4 and mmlu["acc"] == pytest.approx(4 / 7)
    assert mmlu["subjects"]["astronomy"] == pytest.approx({"acc": 1.0, "acc_stderr": 0.0, "n": 4})
    assert mmlu["subjects"]["world_history"]["acc"] == 0.0
    for row in report["items"]["mmlu"]:
        line = int(row["id"].rsplit(":", 1)[1]) - 1
        assert [r[0] for r in row["response"]] == pytest.approx(reference[line], abs=1e-4)
        assert row["acc"] == float(line % 2 == 0)
    assert [r["where"] for r in report["rejected"]["mmlu.test"]] == [f"{test}:8"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| MMLU | acc (all questions) | 57.14" in md and "| 7 | 1 | 1 |" in md and "world_history" in md
    assert report["lm_eval"]["lm_eval_version"] == "0.4.13"
    assert report["settings"]["files"]["mmlu.test"]["sha256"] == text_suite.sha256(test)


class ScriptedLM:
    """An lm_eval LM whose generations are written by hand (keyed by the question): GSM8K's extraction and
    exact match run on them through lm_eval's own pipeline."""

    def __new__(cls, answers: dict[str, str]):
        from lm_eval.api.model import LM

        class _Scripted(LM):
            def generate_until(self, requests, disable_tqdm=False):
                self.prompts = [r.args[0] for r in requests]
                return [next(a for q, a in answers.items() if q in r.args[0]) for r in requests]

            def loglikelihood(self, requests, disable_tqdm=False):
                raise NotImplementedError

            def loglikelihood_rolling(self, requests, disable_tqdm=False):
                raise NotImplementedError

        return _Scripted()


def test_gsm8k_extraction_on_scripted_generations(tmp_path):
    from ualm_nemo.eval.text_sets import read_gsm8k

    cases = [  # question, reference answer, generation, strict-match, flexible-extract
        ("Clips?", "48 + 24 = 72\n#### 72", "She sold 48+24 = 72 clips.\n#### 72", 1, 1),
        ("Dollars?", "#### 1234", "The total is $1,234.", 0, 1),
        ("Eggs?", "#### 5", "It is 5? No: 6.\n#### 6", 0, 0),
        ("Cats?", "#### 5", "#### 5.", 1, 1),
    ]
    test = read_gsm8k(_jsonl(tmp_path / "gsm8k.jsonl", [{"question": q, "answer": a} for q, a, *_ in cases]))
    task = text_bench.write_gsm8k_task(test, None, 0, tmp_path / "tasks")
    lm = ScriptedLM({q: g for q, _, g, *_ in cases})
    results = text_bench.evaluate(lm, [task], tmp_path / "tasks", None)
    assert sorted(lm.prompts) == sorted(f"Question: {q}\nAnswer:" for q, *_ in cases)  # lm_eval's gsm8k prompt
    figures = text_bench.gsm8k_figures(results)
    assert figures["n"] == 4
    assert figures["strict-match"] == pytest.approx(0.5) and figures["flexible-extract"] == pytest.approx(0.75)
    by_item = {(s["id"], s["filter"]): s["exact_match"] for s in text_bench.samples(results, task)}
    for n, (*_, strict, flexible) in enumerate(cases, start=1):
        where = f"{tmp_path / 'gsm8k.jsonl'}:{n}"
        assert (by_item[(where, "strict-match")], by_item[(where, "flexible-extract")]) == (strict, flexible)


def test_humaneval_runs_code_only_with_the_flag(tmp_path):
    problems = humaneval.load_problems(3)
    assert list(problems) == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert len(humaneval.load_problems()) == 164
    marker = tmp_path / "executed"
    canonical = {t: p["canonical_solution"] for t, p in problems.items()}
    spy = dict(canonical, **{"HumanEval/2": f"    open({str(marker)!r}, 'w').write('ran')\n"
                                            + canonical["HumanEval/2"]})
    result = humaneval.score(spy, problems, tmp_path / "samples.jsonl", allow_code_execution=False)
    assert not result.executed and result.pass_at_1 is None and "NOT executed" in result.note
    assert not marker.exists() and not (tmp_path / "samples.jsonl_results.jsonl").exists()
    result = humaneval.score(spy, problems, tmp_path / "samples.jsonl", allow_code_execution=True, n_workers=2)
    assert marker.read_text() == "ran"  # the flag is what runs model-written code
    assert result.executed and result.pass_at_1 == 1.0 and result.passed == 3
    wrong = dict(canonical, **{"HumanEval/1": "    return []\n"})
    result = humaneval.score(wrong, problems, tmp_path / "samples.jsonl", allow_code_execution=True, n_workers=2)
    assert result.pass_at_1 == pytest.approx(2 / 3) and result.per_problem["HumanEval/1"].startswith("failed")
    with pytest.raises(humaneval.HumanEvalError, match="1 missing"):
        humaneval.score({"HumanEval/0": "x"}, dict(list(problems.items())[:2]), tmp_path / "s.jsonl", False)


def _cli(argv):
    return load_example("evaluate").main(["text", *argv])


def test_text_suite_command_gsm8k_humaneval_resume(model, tmp_path, capsys, caplog):
    gsm = _jsonl(tmp_path / "gsm8k.jsonl", [{"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"}
                                            for i in range(3)] + [{"question": "No answer line", "answer": "7"}])
    out = tmp_path / "out"
    argv = ["--hf", str(model["hf"]), "--tokenizer", str(model["tok"]), "--gsm8k", str(gsm), "--gsm8k-train",
            str(gsm), "--gsm8k-shots", "1", "--humaneval", "--limit", "2", "--max-new-tokens", "6",
            "--batch-size", "2", "--dtype", "float32", "--out-dir", str(out), "--no-progress"]
    assert _cli(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["figures"]["gsm8k"]["n"] == 2 and report["settings"]["limit"] == 2
    assert [r["where"] for r in report["rejected"]["gsm8k.test"]] == [f"{gsm}:4"]
    h = report["figures"]["humaneval"]
    assert h == {**h, "executed": False, "pass@1": None, "n": 2} and "NOT executed" in h["note"]
    assert not list(out.glob("humaneval/*_results.jsonl"))
    assert "| HumanEval | pass@1 (greedy) | not executed | 2 |" in (out / "report.md").read_text()
    completions = (out / "humaneval" / "completions.jsonl").read_text().splitlines()
    assert len(completions) == 2
    # a run killed mid-write: one completion kept, the next torn; the rerun regenerates exactly that one
    (out / "humaneval" / "completions.jsonl").write_text(completions[0] + "\n" + completions[1][:9])
    caplog.clear()
    with caplog.at_level("INFO", logger="lm_eval"):
        assert _cli(argv) == 0
    assert "Cached requests: 2, Requests remaining: 0" in caplog.text  # GSM8K answered from the run's cache
    assert (out / "humaneval" / "completions.jsonl").read_text().splitlines() == completions
    assert json.loads((out / "report.json").read_text())["figures"]["gsm8k"] == report["figures"]["gsm8k"]
    capsys.readouterr()
    other = list(argv)
    other[other.index("--limit") + 1] = "1"
    with pytest.raises(SystemExit):  # the same folder with other settings is refused, naming them
        _cli(other)
    assert "holds a run with other settings (limit): use --overwrite" in capsys.readouterr().err
    assert _cli(argv + ["--allow-code-execution"]) == 0  # the same run, now executed: nothing regenerated
    h = json.loads((out / "report.json").read_text())["figures"]["humaneval"]
    assert h["executed"] and h["n"] == 2 and h["pass@1"] == h["passed"] / 2
    assert (out / "humaneval" / "completions.jsonl").read_text().splitlines() == completions

def _bad(tmp_path: Path, model) -> list[tuple[list[str], str]]:
    good = _jsonl(tmp_path / "good.jsonl", [{"question": "Q?", "choices": ["a", "b"], "answer": "B"}])
    broken = _jsonl(tmp_path / "broken.jsonl", ['{"question": "Q?", "choices": ["a", "b"], "answer": 0}',
                                                '{"question": "Q2?", "choices": ['])
    empty = _jsonl(tmp_path / "empty.jsonl", ["", "  "])
    unusable = _jsonl(tmp_path / "unusable.jsonl", [{"question": "Q?", "choices": "ab", "answer": 0}, "[1, 2]"])
    base = ["--hf", str(model["hf"]), "--tokenizer", str(model["tok"]), "--out-dir", str(tmp_path / "o")]
    return [
        (["--hf", str(tmp_path / "nowhere"), "--tokenizer", str(model["tok"]), "--mmlu", str(good),
          "--mmlu-shots", "0"], "not an exported HF folder"),
        (base + ["--mmlu", str(tmp_path / "missing.jsonl"), "--mmlu-shots", "0"], "missing.jsonl: no such file"),
        (base + ["--mmlu", str(broken), "--mmlu-shots", "0"], f"{broken}:2: not a JSON line"),
        (base + ["--mmlu", str(empty), "--mmlu-shots", "0"], "empty (no entries)"),
        (base + ["--mmlu", str(unusable), "--mmlu-shots", "0"], f"no usable entry (2 rejected, e.g. {unusable}:1"),
        (base + ["--mmlu", str(good)], "--mmlu-shots 5 needs --mmlu-dev"),
        (base + ["--mmlu", str(good), "--mmlu-dev", str(good), "--mmlu-shots", "2"],
         "fewer than 2 few-shot entries for subject(s) all"),
        (base + ["--gsm8k", str(good), "--gsm8k-shots", "0"], 'no "#### <final answer>" line'),
        (base + ["--mmlu", str(good), "--mmlu-shots", "0", "--allow-code-execution"], "only for --humaneval"),
        (base, "nothing to run"),
        (base + ["--humaneval", "--limit", "0"], "--limit 0: must be >= 1"),
        (["--hf", str(model["hf"]), "--tokenizer", str(tmp_path), "--humaneval"], "no tokenizer files"),
    ]


def test_bad_input_stops_before_the_model_with_the_reason(model, tmp_path, capsys):
    for argv, message in _bad(tmp_path, model):
        with pytest.raises(SystemExit) as exit_info:
            _cli(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err, (argv, err)
    assert not (tmp_path / "o").exists()  # nothing was started
