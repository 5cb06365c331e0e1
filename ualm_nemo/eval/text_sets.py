"""Local text-benchmark sets, read and checked before any model loads.

MMLU-style: JSON lines ``{"question", "choices": [...], "answer": index or letter, "subject"}`` (what
``datasets.load_dataset("cais/mmlu", "all")[split].to_json(...)`` writes; ``subject`` optional). GSM8K: JSON lines
``{"question", "answer"}`` whose answer ends with the ``#### <final answer>`` line the reference extraction reads.
A line that is not JSON stops the run (file:line: a truncated or wrong file); an entry with a missing or mistyped
field is rejected, listed with file:line and reason and counted in the report, never dropped silently.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

LETTERS = string.ascii_uppercase


class TextSetError(ValueError):
    """A benchmark file that cannot be used at all (missing, not JSON lines, empty, no usable entry)."""


@dataclass(frozen=True)
class Reject:
    where: str  # file:line
    reason: str


@dataclass(frozen=True)
class TextSet:
    """Normalised entries (``id`` = file:line) and the rejected ones, of one file."""

    path: Path
    items: list[dict[str, Any]]
    rejected: list[Reject]


def _lines(path: Path, flag: str) -> list[tuple[str, Any]]:
    """(file:line, parsed value) of every non-blank line."""
    if not path.is_file():
        raise TextSetError(f"{flag} {path}: no such file")
    out = []
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as err:
                raise TextSetError(f"{where}: not UTF-8 ({err.reason})") from None
            if not line:
                continue
            try:
                out.append((where, json.loads(line)))
            except json.JSONDecodeError as err:
                raise TextSetError(f"{where}: not a JSON line ({err.msg} at column {err.colno}); {flag} takes "
                                   "JSON lines, one entry per line") from None
    if not out:
        raise TextSetError(f"{flag} {path}: empty (no entries)")
    return out


def _text(entry: dict, key: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f'"{key}" must be a non-empty string, got {value!r}'[:200])
    return value


def _mmlu_entry(entry: dict) -> dict[str, Any]:
    question = _text(entry, "question")
    choices = entry.get("choices")
    if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS) or \
            not all(isinstance(c, str) for c in choices):
        raise ValueError(f'"choices" must be a list of 2 to {len(LETTERS)} strings, got {choices!r}'[:200])
    answer = entry.get("answer")
    if isinstance(answer, str) and len(answer) == 1 and answer.upper() in LETTERS[:len(choices)]:
        answer = LETTERS.index(answer.upper())
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise ValueError(f'"answer" must be a choice index (0..{len(choices) - 1}) or letter, got {answer!r}')
    subject = entry.get("subject", "all")
    if not isinstance(subject, str) or not subject.strip():
        raise ValueError(f'"subject" must be a non-empty string, got {subject!r}')
    return {"question": question, "choices": choices, "letters": list(LETTERS[:len(choices)]), "answer": answer,
            "subject": subject.strip()}


def _gsm8k_entry(entry: dict) -> dict[str, Any]:
    question, answer = _text(entry, "question"), _text(entry, "answer")
    if "#### " not in answer or not answer.rsplit("#### ", 1)[1].strip():
        raise ValueError('"answer" has no "#### <final answer>" line (the reference the exact match compares to)')
    return {"question": question, "answer": answer}


def _read(path: str | Path, flag: str, normalise: Callable[[dict], dict]) -> TextSet:
    path = Path(path)
    items, rejected = [], []
    for where, entry in _lines(path, flag):
        try:
            if not isinstance(entry, dict):
                raise ValueError(f"not a JSON object ({type(entry).__name__})")
            items.append({"id": where, **normalise(entry)})
        except ValueError as err:
            rejected.append(Reject(where, str(err)))
    if not items:
        raise TextSetError(f"{flag} {path}: no usable entry ({len(rejected)} rejected, e.g. {rejected[0].where}: "
                           f"{rejected[0].reason})")
    return TextSet(path, items, rejected)


def read_mmlu(path: str | Path, flag: str = "--mmlu") -> TextSet:
    return _read(path, flag, _mmlu_entry)


def read_gsm8k(path: str | Path, flag: str = "--gsm8k") -> TextSet:
    return _read(path, flag, _gsm8k_entry)


def check_fewshot_subjects(test: TextSet, dev: TextSet, shots: int, flag: str) -> None:
    """MMLU draws its few-shot examples from the same subject's dev entries: each subject needs ``shots``."""
    have: dict[str, int] = {}
    for item in dev.items:
        have[item["subject"]] = have.get(item["subject"], 0) + 1
    short = sorted({i["subject"] for i in test.items if have.get(i["subject"], 0) < shots})
    if short:
        raise TextSetError(f"{flag} {dev.path}: fewer than {shots} few-shot entries for subject(s) "
                           f"{', '.join(short[:5])}{' ...' if len(short) > 5 else ''} (have "
                           f"{', '.join(str(have.get(s, 0)) for s in short[:5])}); give more or fewer shots")
