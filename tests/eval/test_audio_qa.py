"""MMAU / MMAR: the official matching cases, readers that count rejects, scores with every item in the total."""

from __future__ import annotations

import json

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
