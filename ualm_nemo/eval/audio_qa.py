"""Audio question answering benchmarks (MMAU, MMAR): readers, prompts and the official matching rule.

Matching (the official MMAU / MMAR scripts): lower-cased word sets (``\\b\\w+\\b``); a prediction is correct iff
every word of the answer is in it and no word of another choice is (words the other choice shares with the
answer excepted). So "(A) Man" and "man's voice" match "Man"; "A" and "It is a man, not a woman" do not. The
prompt therefore asks for the option text, not its letter.

Every item is scored: an item without a prediction counts as wrong. The upstream scripts leave such an item out
of the total instead, which inflates accuracy; that figure is reported beside ours
(``QAScore.accuracy_over_answered``) so results compare with published ones. Choices that are empty strings (4
items of the published ``MMAR-meta.jsonl``) hold no words, so the official rule ignores them: they are dropped,
and those items are scored (MMAR's total is 1000). Breakdowns: MMAU by task, difficulty, category,
sub-category; MMAR by modality, category, sub-category.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

_WORD = re.compile(r"\b\w+\b")

BREAKDOWNS = {"mmau": ("task", "difficulty", "category", "sub-category"),
              "mmar": ("modality", "category", "sub-category")}
AUDIO_FIELD = {"mmau": "audio_id", "mmar": "audio_path"}


def words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def is_correct(prediction: str, answer: str, choices: Sequence[str]) -> bool:
    """The official rule (module docstring)."""
    said, wanted = words(prediction), words(answer)
    if not wanted or not wanted <= said:
        return False
    others = set().union(*(words(c) for c in choices if c.strip().lower() != answer.strip().lower()))
    return not (others - wanted) & said


@dataclass(frozen=True)
class QAItem:
    id: str
    audio: Path
    question: str
    choices: tuple[str, ...]
    answer: str
    groups: Mapping[str, str] = field(default_factory=dict)  # breakdown key -> value (e.g. "task": "sound")

    def prompt(self) -> str:
        """The question with its options, asking for the option's text (what the matching rule scores)."""
        options = "\n".join(f"({chr(65 + k)}) {c}" for k, c in enumerate(self.choices))
        return f"{self.question}\nChoices:\n{options}\nAnswer with the text of the correct choice."


@dataclass
class Rejected:
    where: str
    reason: str


def read_benchmark(path: str | Path, kind: str, audio_root: str | Path | None = None) -> tuple[list[QAItem],
                                                                                           list[Rejected]]:
    """An MMAU or MMAR file -> (items, rejected entries with their reasons). The file is a json list (MMAU's
    test-mini) or JSON lines (MMAR's ``MMAR-meta.jsonl`` as published; a line that is not JSON is rejected, not
    fatal). Relative audio paths resolve against ``audio_root`` (default: the file's folder). A file that is
    neither is an error."""
    if kind not in BREAKDOWNS:
        raise ValueError(f"benchmark kind {kind!r}: expected one of {sorted(BREAKDOWNS)}")
    path = Path(path)
    entries, rejected = _entries(path)
    root = Path(audio_root) if audio_root is not None else path.parent
    items, seen = [], set()
    for where, entry in entries:
        try:
            item = _item(entry, kind, root)
        except ValueError as err:
            rejected.append(Rejected(where, str(err)))
            continue
        if item.id in seen:
            rejected.append(Rejected(where, f"duplicate id {item.id!r}"))
            continue
        seen.add(item.id)
        items.append(item)
    return items, rejected


def _entries(path: Path) -> tuple[list[tuple[str, Any]], list[Rejected]]:
    """The file's entries with where each stands (``file[index]`` or ``file:line``), and the lines that are not
    JSON. A json list is read whole; anything else as JSON lines."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: cannot read the benchmark file: {err}") from err
    if text.lstrip().startswith("["):
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: cannot read the benchmark json: {err}") from err
        if not entries:
            raise ValueError(f"{path}: expected a non-empty json list (or JSON lines) of questions")
        return [(f"{path}[{k}]", e) for k, e in enumerate(entries)], []
    entries, rejected = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                entries.append((f"{path}:{number}", json.loads(line)))
            except json.JSONDecodeError as err:
                rejected.append(Rejected(f"{path}:{number}", f"not a JSON line: {err}"))
    if not entries:
        first = f" ({rejected[0].where}: {rejected[0].reason})" if rejected else ""
        raise ValueError(f"{path}: expected a non-empty json list (or JSON lines) of questions{first}")
    return entries, rejected


def _item(entry: Any, kind: str, root: Path) -> QAItem:
    if not isinstance(entry, dict):
        raise ValueError(f"expected an object, got {type(entry).__name__}")
    missing = [k for k in ("id", AUDIO_FIELD[kind], "question", "choices", "answer") if k not in entry]
    if missing:
        raise ValueError(f"missing field(s) {missing}")
    choices = entry["choices"]
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise ValueError("choices must be a list of strings")
    choices = [c for c in choices if c.strip()]  # MMAR lists 4 items with a trailing "": no words, no effect
    if len(choices) < 2:
        raise ValueError("choices must hold at least 2 non-empty strings")
    answer = entry["answer"]
    if not isinstance(answer, str) or answer.strip().lower() not in [c.strip().lower() for c in choices]:
        raise ValueError(f"answer {answer!r} is not one of the choices")
    groups = {}
    for key in BREAKDOWNS[kind]:
        value = entry.get(key)
        groups[key] = "/".join(map(str, value)) if isinstance(value, list) else str(value or "unknown")
    audio = Path(str(entry[AUDIO_FIELD[kind]]))
    return QAItem(str(entry["id"]), audio if audio.is_absolute() else root / audio, str(entry["question"]),
                  tuple(choices), answer, groups)


@dataclass
class QAScore:
    accuracy: float
    correct: int
    total: int
    unanswered: int
    by_group: dict[str, dict[str, dict[str, float]]]  # key -> value -> {"accuracy", "correct", "total"}
    items: list[dict[str, Any]]  # every item with its prediction and verdict

    @property
    def answered(self) -> int:
        return self.total - self.unanswered

    @property
    def accuracy_over_answered(self) -> float | None:
        """The official scripts' figure: items without a prediction left out of the total (None: none answered).
        Published MMAU / MMAR numbers use it; ``accuracy`` (every item) is never higher."""
        return self.correct / self.answered if self.answered else None


def score(items: Sequence[QAItem], predictions: Mapping[str, str]) -> QAScore:
    """Accuracy over every item (unanswered ones count as wrong), overall and per breakdown group."""
    if not items:
        raise ValueError("no items to score")
    unknown = set(predictions) - {i.id for i in items}
    if unknown:
        raise ValueError(f"{len(unknown)} predictions for ids not in the benchmark, e.g. {sorted(unknown)[:3]}")
    tally: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    records, correct = [], 0
    for item in items:
        prediction = predictions.get(item.id)
        ok = prediction is not None and is_correct(prediction, item.answer, item.choices)
        correct += ok
        for key, value in item.groups.items():
            tally[key][value][0] += ok
            tally[key][value][1] += 1
        records.append({"id": item.id, "prediction": prediction, "answer": item.answer, "correct": ok,
                        **item.groups})
    by_group = {key: {value: {"accuracy": c / t, "correct": c, "total": t} for value, (c, t) in sorted(v.items())}
                for key, v in tally.items()}
    return QAScore(correct / len(items), correct, len(items), sum(i.id not in predictions for i in items), by_group,
                   records)
