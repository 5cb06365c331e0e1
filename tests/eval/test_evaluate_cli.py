"""examples/evaluate.py understanding on a tiny MMAU-style set with the tiny exported UALM: answers recorded,
resumed, scored; malformed entries listed, unreadable audio counted as wrong (the denominator never shrinks)."""

from __future__ import annotations

import json

import pytest

from ualm_nemo.testing.eval_sets import write_mmau_set
from ualm_nemo.testing.examples import load_example


def test_understanding_suite_end_to_end(tiny_export, tmp_path, capsys):
    data, out = write_mmau_set(tmp_path, tiny_export["tone"]), tmp_path / "eval"
    argv = ["understanding", "--benchmark", "mmau", "--data", str(data), "--checkpoint", str(tiny_export["hf"]),
            "--max-answer-tokens", "4", "--batch-size", "2", "--out-dir", str(out), "--no-progress"]
    assert load_example("evaluate").main(argv) == 0
    printed = capsys.readouterr().out
    assert "rejected" in printed and "1 malformed entries not scored, 1 unreadable counted wrong" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["total"] == 4 and report["unanswered"] == 1  # 3 answered + the unreadable one, counted
    assert [r["reason"].split(" ")[0] for r in report["rejected_entries"]] == ["answer"]
    assert "gone" in report["skipped_items"] and "unreadable" in report["skipped_items"]["gone"]
    assert {i["id"] for i in report["items"]} == {"q0", "q1", "q2", "gone"}
    assert all(isinstance(i["prediction"], str) for i in report["items"] if i["id"] != "gone")
    assert report["by_group"]["task"]["sound"]["total"] == 4
    assert report["answered"] == 3 and report["accuracy_over_answered"] == report["correct"] / 3  # official figure
    assert f"official scripts' convention): {100 * report['correct'] / 3:.2f} % ({report['correct']} / 3)" in printed
    assert "| sound |" in (out / "report.md").read_text()
    first = (out / "manifest.jsonl").read_text()
    assert load_example("evaluate").main(argv) == 0  # resumed: nothing answered again, the same report
    assert "already answered" in capsys.readouterr().out
    assert (out / "manifest.jsonl").read_text() == first
    assert json.loads((out / "report.json").read_text())["items"] == report["items"]


def test_bad_benchmark_files_are_refused(tiny_export, tmp_path, capsys):
    base = ["understanding", "--benchmark", "mmau", "--checkpoint", str(tiny_export["hf"]), "--out-dir",
            str(tmp_path / "never")]
    (tmp_path / "empty.json").write_text("[]")
    (tmp_path / "junk.json").write_text(json.dumps([{"id": 1}]))
    for data, message in ((tmp_path / "empty.json", "non-empty"), (tmp_path / "junk.json", "no usable entry"),
                          (tmp_path / "nothing.json", "cannot read")):
        with pytest.raises(SystemExit):
            load_example("evaluate").main(base + ["--data", str(data)])
        assert message in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
