"""examples/make_preference_pairs.py end to end on real parts: the tiny exported UALM and tiny X-Codec (the suite's
``tiny_export``), random-weight CLAP and AudioBox-Aesthetics checkpoints in their release formats (as
tests/eval/conftest.py writes them; only these two are built here), the byte tokenizer.

Covered: the output format (codes, wavs, candidates.jsonl, pairs.jsonl, report.json), the rule (chosen is the
best, rejected the worst, by the margin), the codes being exactly what the generator returns for the candidate's
seed, resume (nothing generated when all is done; only the killed prompt redone), other settings refused, the
min-margin skip counted, bad input refused before any work.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ualm_nemo.posttrain import preference_pairs as pp
from ualm_nemo.testing.examples import load_example, run_ok, run_refused

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(300)

cli = load_example("make_preference_pairs")
PROMPTS = [{"id": "dog", "caption": "a dog barks twice in a large hall"},
           {"id": "chat", "prompt": [{"role": "system", "content": "You make sounds."},
                                     {"role": "user", "content": "make me some rain please"}], "caption": "rain"}]
MORE = [{"id": "beep", "caption": "a high beep"}, {"id": 7, "prompt": [{"role": "user", "content": "wind"}]}]
AES = ("aes_ce", "aes_cu", "aes_pc", "aes_pq")


@pytest.fixture(scope="module")
def metric_files(tmp_path_factory) -> dict[str, Path]:
    """CLAP (RoBERTa cut to one layer, byte-level vocabulary) and aesthetics checkpoints with random weights, in
    their release formats."""
    from ualm_nemo.testing.metric_models import write_random_aes, write_random_clap

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("metric_models")
    torch.manual_seed(0)
    paths = write_random_clap(root)
    paths["aes"] = write_random_aes(root / "checkpoint.pt")
    return paths


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _argv(parts, models, prompts: Path, out: Path, *extra: str, checkpoint: Path | None = None) -> list[str]:
    return ["--checkpoint", str(checkpoint or parts["hf"]), "--codec", str(parts["codec"]), "--prompts",
            str(prompts), "--output", str(out), "--clap", str(models["clap"]), "--clap-tokenizer",
            str(models["clap_tokenizer"]), "--max-frames", "6", "--no-progress", *extra]


def _snapshot(out: Path) -> dict[str, tuple[int, int, bytes]]:
    return {str(p.relative_to(out)): (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def main_run(tiny_export, metric_files, tmp_path_factory):
    """Default metrics (clap=1.0, aes_pq=0.25): 2 prompts x K=2, batch 4 (both prompts in one decoding call)."""
    root = tmp_path_factory.mktemp("pairs")
    prompts = _jsonl(root / "prompts.jsonl", PROMPTS)
    argv = _argv(tiny_export, metric_files, prompts, root / "out", "--num-candidates", "2", "--batch-size", "4",
                 "--aes", str(metric_files["aes"]), "--seed", "5")
    assert cli.main(argv) == 0
    return root / "out", argv


def test_output_format_and_rule(main_run, metric_files):
    out, _ = main_run
    lines = _read(out / pp.CANDIDATES)
    assert [(e["prompt_id"], e["k"]) for e in lines] == [("dog", 0), ("dog", 1), ("chat", 0), ("chat", 1)]
    for e in lines:
        assert e["seed"] == pp.candidate_seed(5, e["prompt_id"], e["k"])
        assert e["codes"] == f"candidates/{e['prompt_id']}/{e['k']}.npy"
        assert e["audio"] == f"candidates/{e['prompt_id']}/{e['k']}.wav"
        codes = np.load(out / e["codes"])
        assert codes.dtype == np.int16 and codes.shape == (e["frames"], 8) and 1 <= e["frames"] <= 6
        assert codes.min() >= 0 and codes.max() < 1024
        assert set(e["scores"]) == {"clap", *AES} and -1 <= e["scores"]["clap"] <= 1
        assert e["combined"] == pytest.approx(e["scores"]["clap"] + 0.25 * e["scores"]["aes_pq"])
        assert e["response"] == [{"codes": e["codes"]}]
        assert (out / e["audio"]).is_file()
    assert lines[2]["prompt"] == PROMPTS[1]["prompt"] and lines[2]["caption"] == "rain"
    assert lines[0]["prompt"] == [{"role": "user", "content": PROMPTS[0]["caption"]}]
    assert len({e["seed"] for e in lines}) == 4 and len({(out / e["codes"]).read_bytes() for e in lines}) == 4

    pairs = _read(out / pp.PAIRS)
    assert [p["id"] for p in pairs] == ["dog", "chat"]  # random weights: no two candidates score the same
    for pair in pairs:
        assert set(pair) == {"id", "prompt", "chosen", "rejected", "scores"}
        cands = {e["k"]: e for e in lines if e["prompt_id"] == pair["id"]}
        assert pair["prompt"] == cands[0]["prompt"]
        (chosen,), (rejected,) = pair["chosen"], pair["rejected"]
        best = max(cands.values(), key=lambda e: e["combined"])
        worst = min(cands.values(), key=lambda e: e["combined"])
        assert chosen == {"codes": best["codes"]} and rejected == {"codes": worst["codes"]}
        scores = pair["scores"]
        assert scores["rule"] == "best-vs-worst"
        assert scores["chosen"] == {**best["scores"], "combined": best["combined"]}
        assert scores["rejected"] == {**worst["scores"], "combined": worst["combined"]}
        assert scores["margin"] > 0
        assert scores["chosen"]["combined"] >= scores["rejected"]["combined"] + scores["margin"] - 1e-12

    from ualm_nemo.data.conversation import CodesRef, read_preference_manifest

    read = read_preference_manifest(out / pp.PAIRS)  # what the DPO data side reads, every codes file checked
    assert not read.rejects and [r.id for r in read.records] == ["dog", "chat"]
    assert read.records[0].chosen == (CodesRef(out / pairs[0]["chosen"][0]["codes"]),)
    assert [t.role for t in read.records[1].prompt] == ["system", "user"]

    report = json.loads((out / pp.REPORT).read_text())
    assert (report["prompts"], report["candidates"], report["pairs"]) == (2, 4, 2)
    assert report["skipped"] == {"too_few_scored": 0, "tie": 0, "margin_below_min": 0}
    assert report["rule"] == {"name": "best-vs-worst", "weights": {"clap": 1.0, "aes_pq": 0.25}, "min_margin": 0.0}
    assert report["this_run"] == {"prompts_generated": 2, "prompts_already_done": 0}
    assert report["metric_models"]["clap"]["path"] == str(metric_files["clap"].resolve())
    assert len(report["metric_models"]["aes"]["sha256"]) == 64
    assert not list(out.rglob(".*partial"))


def test_codes_are_what_the_generator_returns_for_the_seed(main_run, tiny_export):
    """One candidate per prompt regenerated alone, straight from UALMInference: the same codes as the file."""
    from ualm_nemo.codec.xcodec import CodecTokenizer
    from ualm_nemo.data.tokenizer import ByteChatTokenizer
    from ualm_nemo.inference.engine import GenerationConfig
    from ualm_nemo.inference.pipeline import UALMInference, load_model

    out, _ = main_run
    infer = UALMInference(load_model(tiny_export["hf"]), ByteChatTokenizer(),
                          CodecTokenizer.from_pretrained(tiny_export["codec"]))
    cfg = GenerationConfig(max_frames=6)
    (dog,) = infer.text_to_audio([PROMPTS[0]["caption"]], [pp.candidate_seed(5, "dog", 1)], cfg)
    assert np.array_equal(np.load(out / "candidates/dog/1.npy"), dog.audio[0].codes.numpy())
    conversation = [(t["role"], [t["content"]]) for t in PROMPTS[1]["prompt"]]
    (chat,) = infer.reply([conversation], "audio", [pp.candidate_seed(5, "chat", 0)], cfg)
    assert np.array_equal(np.load(out / "candidates/chat/0.npy"), chat.audio[0].codes.numpy())


def test_rerun_skips_everything_and_other_settings_are_refused(main_run, monkeypatch, capsys, tmp_path):
    out, argv = main_run
    before = _snapshot(out)

    def no_model(*_args, **_kwargs):
        raise AssertionError("nothing is left to generate: no model may be loaded")

    monkeypatch.setattr(cli, "load_inference", no_model)
    monkeypatch.setattr(pp.Scorer, "load", no_model)
    printed = run_ok(cli.main, argv, capsys)
    assert "2 of 2 prompts already done" in printed and "done: 0 prompts generated, 2 already done; 2 pairs" in printed
    after = _snapshot(out)
    for name in ("candidates.jsonl", "settings.json", "candidates/dog/0.npy", "candidates/chat/1.wav"):
        assert after[name] == before[name]  # not rewritten
    assert after["pairs.jsonl"][2] == before["pairs.jsonl"][2]  # rebuilt, the same
    assert json.loads(after["report.json"][2])["this_run"] == {"prompts_generated": 0, "prompts_already_done": 2}

    for extra, change in [(["--num-candidates", "3"], "--num-candidates: written with 2, this run 3"),
                          (["--min-margin", "0.5"], "--min-margin: written with 0.0, this run 0.5"),
                          (["--temperature", "0.7"], "--temperature: written with 0.8, this run 0.7"),
                          (["--seed", "6"], "--seed: written with 5, this run 6"),
                          (["--metric", "clap=1"], "--metric aes_pq: written with 0.25, this run None")]:
        changed = [a for a in argv]
        for flag, value in zip(extra[::2], extra[1::2]):
            if flag in changed:
                changed[changed.index(flag) + 1] = value
            else:
                changed += [flag, value]
        err = run_refused(cli.main, changed, capsys)
        assert "was written with other settings" in err and change in err and "settings.json" in err, err
    other = _jsonl(tmp_path / "other.jsonl", [{"id": "dog", "caption": "a cat"}])
    err = run_refused(cli.main, [*argv, "--prompts", str(other)], capsys)
    assert "with another prompt or caption (dog)" in err
    assert {k: v[2] for k, v in _snapshot(out).items()} == {k: v[2] for k, v in after.items()}  # nothing touched


def test_min_margin_skips_are_counted_and_a_killed_run_resumes(tiny_export, metric_files, tmp_path, capsys):
    """CLAP only, K=3 over 3 prompts, a margin no cosine difference reaches: every prompt skipped and counted.
    Then a kill (the last prompt's lines torn, a wav of another gone, a temporary file left): only those redone."""
    prompts = _jsonl(tmp_path / "prompts.jsonl", [PROMPTS[0], *MORE])
    out = tmp_path / "out"
    argv = _argv(tiny_export, metric_files, prompts, out, "--num-candidates", "3", "--batch-size", "6",
                 "--metric", "clap=1", "--min-margin", "2.5")
    printed = run_ok(cli.main, argv, capsys)
    assert "0 pairs of 3 prompts (skipped: 3 margin_below_min)" in printed
    assert (out / pp.PAIRS).read_text() == ""
    report = json.loads((out / pp.REPORT).read_text())
    assert report["skipped"]["margin_below_min"] == 3
    assert report["skipped_ids"] == {"margin_below_min": ["dog", "beep", "7"]}
    lines = _read(out / pp.CANDIDATES)
    assert [set(e["scores"]) for e in lines] == [{"clap"}] * 9 and "aes" not in report["metric_models"]
    assert lines[-1]["prompt_id"] == "7" and lines[-1]["caption"] == "wind"

    # a lower margin over the same lines keeps the prompts whose margin reaches it (pairs.jsonl is derived data)
    margins = sorted(max(e["combined"] for e in lines if e["prompt_id"] == p) -
                     min(e["combined"] for e in lines if e["prompt_id"] == p) for p in ("dog", "beep", "7"))
    pairs, counts = pp.build_pairs(lines, pp.Rule({"clap": 1.0}, min_margin=margins[1]))
    assert counts["pairs"] == 2 and counts["skipped"]["margin_below_min"] == 1 and len(pairs) == 2

    before = _snapshot(out)
    text = (out / pp.CANDIDATES).read_text().splitlines(keepends=True)
    (out / pp.CANDIDATES).write_text("".join(text[:7]) + text[7][:20])  # "7": k=0 whole, k=1 torn, k=2 missing
    (out / "candidates/beep/2.wav").unlink()
    (out / "candidates/dog/.0.npy.partial").write_bytes(b"\x93NUMPY")
    printed = run_ok(cli.main, argv, capsys)
    assert "incomplete last line" in printed and "1 of 3 prompts already done" in printed
    assert "done: 2 prompts generated, 1 already done" in printed
    after = _snapshot(out)
    assert after["candidates/dog/0.npy"] == before["candidates/dog/0.npy"]  # finished: not rewritten
    for name in ("candidates/beep/2.wav", "candidates/7/1.npy", "candidates/7/0.wav"):
        assert after[name][0] != before[name][0] and after[name][2] == before[name][2]  # redone, the same
    assert sorted((e["prompt_id"], e["k"]) for e in _read(out / pp.CANDIDATES)) == \
        sorted((e["prompt_id"], e["k"]) for e in lines)
    assert not list(out.rglob(".*partial"))


def _worst(lines: list[dict], by: str, n: int) -> tuple[list[str], float]:
    """The n worst prompts by the rule, computed here from the recorded scores (and the threshold score)."""
    combined: dict[str, list[float]] = {}
    for e in lines:
        combined.setdefault(e["prompt_id"], []).append(e["combined"])
    score = {p: max(c) if by == "best" else max(c) - min(c) for p, c in combined.items()}
    ranked = sorted(score, key=score.get, reverse=by == "spread")[:n]
    return ranked, score[ranked[-1]]


def test_select_worst_pairs_only_the_worst_prompts(tiny_export, metric_files, tmp_path, capsys, monkeypatch):
    """Targeted DPO-2: 4 prompts x K=2 (CLAP only, one decoding call), --select-worst 2: only the 2 lowest
    best-candidate scores get pairs, the report and the printout say how; a rerun selects the same; spread and
    N over the pool on the same recorded lines."""
    prompts = _jsonl(tmp_path / "prompts.jsonl", [*PROMPTS, *MORE])
    out = tmp_path / "out"
    argv = _argv(tiny_export, metric_files, prompts, out, "--num-candidates", "2", "--batch-size", "8",
                 "--metric", "clap=1", "--select-worst", "2")
    printed = run_ok(cli.main, argv, capsys)
    lines = _read(out / pp.CANDIDATES)
    assert len(lines) == 8 and len({e["combined"] for e in lines}) == 8  # random weights: no ties
    worst, threshold = _worst(lines, "best", 2)
    pairs = _read(out / pp.PAIRS)
    assert sorted(p["id"] for p in pairs) == sorted(worst)
    report = json.loads((out / pp.REPORT).read_text())
    sel = report["selection"]
    assert (sel["by"], sel["worst"], sel["pool"], sel["selected"], sel["keeps_all"]) == ("best", 2, 4, 2, False)
    assert sel["selected_ids"] == worst and sel["threshold"] == pytest.approx(threshold)
    assert report["prompts"] == 4 and report["pairs"] == 2
    assert "selection: --select-worst 2 by best (lowest best-candidate combined score) over a pool of 4 prompts: " \
           "kept the 2 worst (threshold" in printed

    def no_model(*_args, **_kwargs):
        raise AssertionError("nothing is left to generate: no model may be loaded")

    monkeypatch.setattr(cli, "load_inference", no_model)
    monkeypatch.setattr(pp.Scorer, "load", no_model)
    before = (out / pp.PAIRS).read_bytes()
    run_ok(cli.main, argv, capsys)
    assert (out / pp.PAIRS).read_bytes() == before
    assert json.loads((out / pp.REPORT).read_text())["selection"] == sel
    err = run_refused(cli.main, [*argv, "--select-by", "spread"], capsys)
    assert "--select-by: written with 'best', this run 'spread'" in err

    rule = pp.Rule({"clap": 1.0})
    worst, threshold = _worst(lines, "spread", 3)
    pairs, report = pp.build_pairs(lines, rule, pp.Selection(3, "spread"))
    assert sorted(p["id"] for p in pairs) == sorted(worst) and report["selection"]["selected_ids"] == worst
    assert report["selection"]["threshold"] == pytest.approx(threshold)
    pairs, report = pp.build_pairs(lines, rule, pp.Selection(10))
    assert len(pairs) == 4 and report["selection"]["keeps_all"] and report["selection"]["selected"] == 4
    assert cli._selection_line(report["selection"]).endswith("over a pool of 4 prompts: keeping all 4")


def test_rule_selection():
    rule = pp.Rule({"clap": 1.0, "aes_pq": 0.5}, min_margin=0.1)
    cands = [{"k": k, "combined": rule.combined(s), "scores": s} for k, s in
             enumerate([{"clap": 0.2, "aes_pq": 4.0}, {"clap": 0.5, "aes_pq": 4.0}, {"clap": 0.1, "aes_pq": 4.0}])]
    chosen, rejected, margin, reason = rule.select(cands)
    assert (chosen["k"], rejected["k"], reason) == (1, 2, None) and margin == pytest.approx(0.4)
    assert rule.select(cands[:1])[3] == "too_few_scored"
    assert rule.select([cands[0], {**cands[0], "k": 1}])[3] == "tie"
    assert rule.select([cands[0], {"k": 1, "combined": cands[0]["combined"] + 0.05}])[3] == "margin_below_min"
    assert rule.combined({"clap": 0.3}) is None and rule.combined({"clap": float("nan"), "aes_pq": 1}) is None
    assert rule.select([cands[0], {"k": 1, "combined": None}])[3] == "too_few_scored"
    assert pp.parse_weights([]) == {"clap": 1.0, "aes_pq": 0.25}
    assert pp.candidate_seed(0, "a", 1) == pp.candidate_seed(0, "a", 1) != pp.candidate_seed(0, "a", 2)


@pytest.mark.parametrize("lines, extra, message", [
    (PROMPTS, ["--num-candidates", "1"], "--num-candidates 1: must be >= 2"),
    (PROMPTS, ["--temperature", "0"], "greedy decoding gives K equal candidates"),
    (PROMPTS, ["--metric", "clap"], "--metric 'clap': expected NAME=WEIGHT"),
    (PROMPTS, ["--metric", "fd=1"], "--metric 'fd=1': expected NAME=WEIGHT with NAME one of clap, aes_ce"),
    (PROMPTS, ["--metric", "clap=0"], "every weight is 0"),
    (PROMPTS, ["--min-margin", "-1"], "--min-margin -1.0: must be a finite number >= 0"),
    (PROMPTS, ["--metric", "clap=1", "--select-worst", "0"], "--select-worst 0: must be an integer >= 1"),
    (PROMPTS, ["--metric", "clap=1", "--select-by", "spread"], "--select-by spread: only with --select-worst N"),
    (PROMPTS, [], "--aes: no checkpoint given, and --metric aes_pq needs it"),
    (PROMPTS, ["--aes", "/nonexistent/checkpoint.pt"], "--aes /nonexistent/checkpoint.pt: no such checkpoint file"),
    ([{"id": "a", "caption": "ok"}, {"id": "a", "caption": "x"}, {"id": "c", "caption": " "}, {"caption": "no id"},
      "[1]", {"id": "b", "prompt": [{"role": "assistant", "content": "hi"}]},
      {"id": "d", "prompt": [{"role": "user", "content": "hi"}, {"role": "system", "content": "be loud"}]}],
     ["--metric", "clap=1"], ("6 bad prompt line(s)", ":7: the prompt's last turn is a system turn", ":2: duplicate id 'a' (first at line 1)", ":3: empty caption",
                              ':4: no "id"', ":5: expected a JSON object", ":6: the prompt has no user turn")),
])
def test_bad_input_is_refused_before_any_work(tiny_export, metric_files, tmp_path, capsys, lines, extra, message):
    prompts = _jsonl(tmp_path / "prompts.jsonl", lines)
    # --checkpoint: an existing folder that is no model (a load would fail with "cannot load")
    err = run_refused(cli.main, _argv(tiny_export, metric_files, prompts, tmp_path / "out", *extra, checkpoint=tmp_path), capsys)
    for part in (message if isinstance(message, tuple) else (message,)):
        assert part in err, err
    assert "cannot load" not in err and not (tmp_path / "out").exists()


def test_auto_mode_keeps_text_parts_in_order_and_text_only_candidates_are_not_ranked(tmp_path):
    """pp.generate with a stand-in generator (auto mode: text, audio, both) and scorer: the assistant turn's parts
    as written, a candidate without audio listed but not ranked, K candidates of two prompts in one call."""
    from ualm_nemo.inference.pipeline import Reply, ReplyAudio

    calls = []

    class Infer:
        def reply(self, conversations, mode, seeds, cfg):
            calls.append((len(conversations), mode, list(seeds)))
            replies = []
            for seed in seeds:
                codes = torch.full((3, 8), seed % 1000, dtype=torch.long)
                audio = ReplyAudio(codes, torch.zeros(1, 960) + 0.01 * (seed % 7), 16000)
                replies.append({0: Reply(["only words"]), 1: Reply(["here:", audio]),
                                2: Reply([audio, "done"])}[len(replies) % 3])
            return replies

    class Scorer:
        def scores(self, audio, caption):
            return {"clap": float(np.load(Path(str(audio)[:-4] + ".npy"))[0, 0]) / 1000}

    rule = pp.Rule({"clap": 1.0})
    prompts = [pp.Prompt("a", (("user", "rain"),), "rain"), pp.Prompt("b", (("user", "wind"),), "wind")]
    settings = {"num_candidates": 3}
    with pp.PairsFolder(tmp_path, settings) as folder:
        plan = folder.plan(prompts)
        folder.prepare(plan)
        assert pp.generate(Infer(), None, folder, plan.todo, Scorer(), rule, 0, "auto", 6) == 2
        report = folder.finish(rule, {}, {})
    assert [(n, mode) for n, mode, _ in calls] == [(6, "auto")]  # both prompts' K candidates in one call
    lines = _read(tmp_path / pp.CANDIDATES)
    assert lines[0]["codes"] is None and lines[0]["response"] == [{"text": "only words"}]
    assert lines[1]["response"] == [{"text": "here:"}, {"codes": "candidates/a/1.npy"}]
    assert lines[2]["response"] == [{"codes": "candidates/a/2.npy"}, {"text": "done"}]
    pairs = _read(tmp_path / pp.PAIRS)
    assert len(pairs) == 2 and report["candidates_without_audio"] == 2
    for pair in pairs:
        cands = [e for e in lines if e["prompt_id"] == pair["id"] and e["combined"] is not None]
        best, worst = max(cands, key=lambda e: e["combined"]), min(cands, key=lambda e: e["combined"])
        assert (pair["chosen"], pair["rejected"]) == (best["response"], worst["response"])
    # the same folder planned again: everything finished (text-only candidates have no files to check)
    with pp.PairsFolder(tmp_path, settings) as folder:
        assert folder.plan(prompts).todo == []
