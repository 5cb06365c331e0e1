"""MMAU / MMAR: the official matching cases, readers that count rejects, scores with every item in the total."""

from __future__ import annotations

import json
import re

import pytest

from ualm_nemo.eval.audio_qa import is_correct, read_benchmark, score

CHOICES = ["Man", "Woman", "Child"]


@pytest.mark.parametrize("prediction,correct", [
    ("(A) Man", True), ("man's voice", True), ("Man", True), ("The speaker is a MAN.", True),
    ("A", False), ("It is a man, not a woman", False), ("", False), ("child or man", False),
])
def test_official_matching_cases(prediction, correct):
    assert is_correct(prediction, "Man", CHOICES) is correct


def test_words_shared_with_the_answer_do_not_count_against_it():
    choices = ["dog barking", "cat meowing", "dog growling"]
    assert is_correct("a dog barking", "dog barking", choices)  # "dog" is also in "dog growling"
    assert not is_correct("a dog growling", "dog barking", choices)


def _mmau(tmp_path, entries):
    path = tmp_path / "mmau.json"
    path.write_text(json.dumps(entries))
    return path


def _entry(i, answer="Man", **kw):
    base = {"id": f"q{i}", "audio_id": f"audio/{i}.wav", "question": "Who speaks?", "choices": CHOICES,
            "answer": answer, "task": "speech" if i % 2 else "sound", "difficulty": "easy", "category": ["a", "b"],
            "sub-category": "x"}
    return base | kw


def test_reader_counts_rejects_and_score_keeps_unanswered_in_the_total(tmp_path):
    entries = [_entry(0), _entry(1), _entry(2, answer="Dog"), {"id": "q3"}, _entry(0), _entry(4, choices=["Man"])]
    items, rejected = read_benchmark(_mmau(tmp_path, entries), "mmau")
    assert [i.id for i in items] == ["q0", "q1"]
    assert [r.reason.split(" ")[0] for r in rejected] == ["answer", "missing", "duplicate", "choices"]
    assert items[0].audio == tmp_path / "audio" / "0.wav" and items[0].groups["category"] == "a/b"
    assert "(A) Man\n(B) Woman\n(C) Child" in items[0].prompt() and "text of the correct choice" in items[0].prompt()
    result = score(items, {"q0": "(A) Man"})  # q1 unanswered: wrong, not dropped
    assert (result.correct, result.total, result.unanswered, result.accuracy) == (1, 2, 1, 0.5)
    assert result.by_group["task"] == {"sound": {"accuracy": 1.0, "correct": 1, "total": 1},
                                       "speech": {"accuracy": 0.0, "correct": 0, "total": 1}}
    assert result.items[0] == {"id": "q0", "prediction": "(A) Man", "answer": "Man", "correct": True,
                               "task": "sound", "difficulty": "easy", "category": "a/b", "sub-category": "x"}
    with pytest.raises(ValueError, match="not in the benchmark"):
        score(items, {"q9": "Man"})


def test_mmar_fields_and_bad_files(tmp_path):
    path = tmp_path / "mmar.json"
    path.write_text(json.dumps([{"id": 1, "audio_path": "/abs/a.wav", "question": "q", "choices": ["yes", "no"],
                                 "answer": "no", "modality": "sound", "category": "c", "sub-category": "s"}]))
    items, rejected = read_benchmark(path, "mmar")
    assert not rejected and items[0].id == "1" and str(items[0].audio) == "/abs/a.wav"
    assert items[0].groups == {"modality": "sound", "category": "c", "sub-category": "s"}
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(ValueError, match="non-empty json list"):
        read_benchmark(tmp_path / "empty.json", "mmar")
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match="cannot read"):
        read_benchmark(tmp_path / "broken.json", "mmau")
    with pytest.raises(ValueError, match="kind"):
        read_benchmark(path, "mmlu")


def _official_string_match(answer, prediction, choices):
    """MMAR's code/evaluation.py ``string_match``, written out."""
    tokens = lambda text: set(re.findall(r"\b\w+\b", text.lower()))  # noqa: E731
    said, wanted = tokens(prediction), tokens(answer)
    if not said:
        return False
    wrong = set().union(*(tokens(c) - wanted for c in choices if tokens(c) != wanted))
    return wanted <= said and said.isdisjoint(wrong)


def test_mmar_meta_jsonl_as_published(tmp_path):
    """MMAR-meta.jsonl is JSON lines; its 4 items with a trailing "" choice are scored (total 1000), as the official
    script does; a line that is not JSON is rejected with its line number; the official figure leaves
    unanswered items out."""
    rows = [{"id": "a", "audio_path": "./audio/a.wav", "question": "q", "choices": ["Entered", "Did not enter", ""],
             "answer": "Entered", "modality": "mix-sound-speech", "category": "Semantic Layer",
             "sub-category": "s", "language": None, "rubric": [{"choices": [0, 1]}]},
            {"id": "b", "audio_path": "./audio/b.wav", "question": "q", "choices": ["Yes", "No, there is distortion"],
             "answer": "No, there is distortion", "modality": "music", "category": "Signal Layer"},
            {"id": "c", "audio_path": "./audio/c.wav", "question": "q", "choices": ["x", "y"], "answer": "y",
             "modality": "sound", "category": "Signal Layer"}]
    path = tmp_path / "MMAR-meta.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n{broken\n" + json.dumps(rows[2]) + "\n")
    items, rejected = read_benchmark(path, "mmar")
    assert [i.id for i in items] == ["a", "b", "c"] and items[0].audio == tmp_path / "audio" / "a.wav"
    assert items[0].choices == ("Entered", "Did not enter") and "(C)" not in items[0].prompt()
    assert [(r.where, r.reason.split(":")[0]) for r in rejected] == [(f"{path}:3", "not a JSON line")]
    for prediction in ("Entered", "Did not enter", "entered, not", ""):
        assert is_correct(prediction, "Entered", items[0].choices) == _official_string_match(
            "Entered", prediction, rows[0]["choices"])
    result = score(items, {"a": "Entered", "b": "Yes"})  # c unanswered
    assert (result.correct, result.total, result.answered) == (1, 3, 2)
    assert result.accuracy == pytest.approx(1 / 3) and result.accuracy_over_answered == pytest.approx(1 / 2)
    assert score(items, {}).accuracy_over_answered is None
    (tmp_path / "junk.jsonl").write_text("{broken\n")
    with pytest.raises(ValueError, match="JSON lines.*junk.jsonl:1: not a JSON line"):
        read_benchmark(tmp_path / "junk.jsonl", "mmar")
