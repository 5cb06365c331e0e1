"""Tiny benchmark files for the evaluation command tests (a package module: any test folder can import it)."""

from __future__ import annotations

import json
from pathlib import Path


def write_mmau_set(tmp_path: Path, tone: Path) -> Path:
    """An MMAU-style json: 3 answerable items on ``tone``, one whose audio is missing (counted wrong) and one
    whose answer is not among its choices (rejected as malformed)."""
    entries = [{"id": f"q{i}", "audio_id": str(tone), "question": "What is it?", "choices": ["a tone", "a dog"],
                "answer": "a tone", "task": "sound", "difficulty": "easy", "category": "c", "sub-category": "s"}
               for i in range(3)]
    entries.append(entries[0] | {"id": "gone", "audio_id": str(tmp_path / "missing.wav")})
    entries.append(entries[0] | {"id": "bad", "answer": "a cat"})  # answer not among the choices: rejected
    path = tmp_path / "mmau.json"
    path.write_text(json.dumps(entries))
    return path
