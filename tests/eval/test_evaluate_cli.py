"""examples/evaluate.py understanding on a tiny MMAU-style set with the tiny exported UALM: answers recorded,
resumed, scored; malformed entries listed, unreadable audio counted as wrong (the denominator never shrinks)."""

from __future__ import annotations

import json

import pytest

from ualm_nemo.testing.eval_sets import write_mmau_set, write_unusable_clips
from ualm_nemo.testing.examples import load_example


def test_understanding_suite_end_to_end(tiny_export, tmp_path, capsys):
    data, out = write_mmau_set(tmp_path, tiny_export["tone"]), tmp_path / "eval"
    argv = ["understanding", "--benchmark", "mmau", "--data", str(data), "--checkpoint", str(tiny_export["hf"]),
            "--max-answer-tokens", "4", "--batch-size", "2", "--out-dir", str(out), "--no-progress"]
    assert load_example("evaluate").main(argv) == 0
    printed = capsys.readouterr().out
    assert "rejected" in printed and "1 malformed entries not scored, 1 unreadable and 0 refused" in printed
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


def test_unusable_clips_and_overlong_prompts_are_counted_not_fatal(tiny_export, tmp_path, capsys):
    """A NaN clip, a 10 ms clip, a 0-sample clip and an 80k-character question (over the tiny model's 4096
    positions) are recorded with their reasons and scored wrong; the others are answered; a rerun resumes."""
    data, out = write_mmau_set(tmp_path, tiny_export["tone"]), tmp_path / "eval"
    entries = json.loads(data.read_text())
    entries += [entries[0] | {"id": name, "audio_id": str(path)}
                for name, path in write_unusable_clips(tmp_path).items()]
    entries.append(entries[0] | {"id": "long", "question": "why " * 20000})
    data.write_text(json.dumps(entries))
    argv = ["understanding", "--benchmark", "mmau", "--data", str(data), "--checkpoint", str(tiny_export["hf"]),
            "--max-answer-tokens", "4", "--batch-size", "8", "--out-dir", str(out), "--no-progress"]
    assert load_example("evaluate").main(argv) == 0
    printed = capsys.readouterr().out
    assert "4 unreadable and 1 refused counted wrong" in printed and "not answered long: refused: prompt too long" \
        in printed
    report = json.loads((out / "report.json").read_text())
    skipped = report["skipped_items"]
    assert report["total"] == 8 and report["unanswered"] == 5 and set(skipped) == {"gone", "nan", "short", "empty",
                                                                                      "long"}
    assert "NaN" in skipped["nan"] and "too short (160 samples" in skipped["short"]
    assert "too short (0 samples" in skipped["empty"] and "context limit of 4096" in skipped["long"]
    assert all(isinstance(i["prediction"], str) for i in report["items"] if i["id"] in ("q0", "q1", "q2"))
    assert load_example("evaluate").main(argv) == 0  # the rerun does not stop on them either
    assert "8 of 8 already answered" in capsys.readouterr().out
