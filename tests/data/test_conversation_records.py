"""Conversation and preference manifests: good records parsed, and every bad line a Reject with file:line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

torch.set_num_threads(1)

from ualm_nemo.data.conversation import (AudioRef, CodesRef, ConversationTurn, TextPart, read_conversation_manifest,
                                         read_preference_manifest)
from ualm_nemo.data.rich_caption import RichCaption


@pytest.fixture()
def files(tmp_path: Path) -> Path:
    clips = tmp_path / "clips"
    clips.mkdir()
    t = np.arange(16000 * 2) / 16000
    sf.write(clips / "dog.wav", (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    sf.write(clips / "tiny.wav", np.zeros(200, dtype=np.float32) + 0.1, 16000)  # no encoder frame
    bad = np.zeros(1600, dtype=np.float32)
    bad[10] = np.nan
    sf.write(clips / "nan.wav", bad, 16000, subtype="FLOAT")
    (clips / "broken.wav").write_bytes(b"RIFF not really a wav")
    np.save(clips / "good.npy", np.arange(24, dtype=np.int64).reshape(3, 8))
    np.save(clips / "shape.npy", np.zeros((3, 4), dtype=np.int64))
    np.save(clips / "range.npy", np.full((2, 8), 1024, dtype=np.int64))
    np.save(clips / "float.npy", np.zeros((2, 8), dtype=np.float32))
    (clips / "broken.npy").write_bytes(b"not numpy")
    return tmp_path


def _write(path: Path, lines: list) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def _conv(i: str, *turns) -> dict:
    return {"id": i, "turns": list(turns)}


U = {"role": "user", "content": "make a dog"}
ASSIST = {"role": "assistant", "content": "ok"}

GOOD_CONV = {
    "id": "dog-001",
    "meta": {"anything": 1},  # other top-level keys are metadata
    "turns": [
        {"role": "system", "content": "You are UALM."},
        {"role": "user", "content": "A dog barks in a big hall."},
        {"role": "assistant", "content": [
            {"rich_caption": {"keywords": ["dog", "bark"], "layout": "0-2 s two barks",
                              "description": "A dog barks twice."}},
            {"audio": "clips/dog.wav"}]},
        {"role": "user", "content": [{"audio": "clips/dog.wav", "start": 0.0, "end": 2.0},
                                     {"text": "Describe what you made."}]},
        {"role": "assistant", "content": "Two barks.", "learn": False},
        {"role": "user", "content": "again, from codes"},
        {"role": "assistant", "content": [{"codes": "clips/good.npy"}]},
    ],
}


def test_good_conversation(files):
    result = read_conversation_manifest(_write(files / "conv.jsonl", [GOOD_CONV]))
    assert result.rejects == []
    (r,) = result.records
    assert r.id == "dog-001" and r.source == "conv.jsonl:1"
    caption = RichCaption(("dog", "bark"), "0-2 s two barks", "A dog barks twice.").render()
    dog = files / "clips" / "dog.wav"
    assert r.turns == (
        ConversationTurn("system", (TextPart("You are UALM."),), False),
        ConversationTurn("user", (TextPart("A dog barks in a big hall."),), False),
        ConversationTurn("assistant", (TextPart(caption), AudioRef(dog)), True),
        ConversationTurn("user", (AudioRef(dog, 0.0, 2.0), TextPart("Describe what you made.")), False),
        ConversationTurn("assistant", (TextPart("Two barks."),), False),
        ConversationTurn("user", (TextPart("again, from codes"),), False),
        ConversationTurn("assistant", (CodesRef(files / "clips" / "good.npy"),), True),
    )
    assert AudioRef(dog).key == AudioRef(dog, 0.0).key == (str(dog), 0.0, None)


def test_every_conversation_reject(files):
    bad_lines = [
        ("unknown role", _conv("a", {"role": "robot", "content": "x"}, ASSIST), "role = 'robot'"),
        ("unknown part key", _conv("b", U, {"role": "assistant", "content": [{"txt": "x"}]}), "exactly one of"),
        ("extra part key", _conv("b2", U, {"role": "assistant", "content": [{"text": "x", "start": 1}]}),
         "unknown key 'start'"),
        ("unknown turn key", _conv("b3", U, {"role": "assistant", "content": "x", "weight": 2}),
         "unknown key 'weight'"),
        ("empty turns", _conv("c"), "non-empty list of turns"),
        ("empty content", _conv("d", {"role": "user", "content": "  "}, ASSIST), "content is empty"),
        ("empty parts", _conv("d2", {"role": "user", "content": []}, ASSIST), "content is empty"),
        ("audio not found", _conv("e", {"role": "user", "content": [{"audio": "clips/none.wav"}]}, ASSIST),
         "audio file not found"),
        ("audio unreadable", _conv("f", {"role": "user", "content": [{"audio": "clips/broken.wav"}]}, ASSIST),
         "unreadable audio"),
        ("audio non-finite", _conv("g", U, {"role": "assistant", "content": [{"audio": "clips/nan.wav"}]}),
         "turns[1].content[0]: non-finite samples"),
        ("heard clip too short", _conv("g2", {"role": "user", "content": [{"audio": "clips/tiny.wav"}]}, ASSIST),
         "too short for the audio encoder"),
        ("codes unreadable", _conv("h", U, {"role": "assistant", "content": [{"codes": "clips/broken.npy"}]}),
         "unreadable codes file"),  # not a .npy
        ("codes missing", _conv("h2", U, {"role": "assistant", "content": [{"codes": "clips/none.npy"}]}),
         "codes file not found"),
        ("codes shape", _conv("i", U, {"role": "assistant", "content": [{"codes": "clips/shape.npy"}]}),
         "shape (3, 4)"),
        ("codes range", _conv("j", U, {"role": "assistant", "content": [{"codes": "clips/range.npy"}]}),
         "outside [0, 1024)"),
        ("codes float", _conv("j2", U, {"role": "assistant", "content": [{"codes": "clips/float.npy"}]}),
         "integer codes"),
        ("codes in a user turn", _conv("k", {"role": "user", "content": [{"codes": "clips/good.npy"}]}, ASSIST),
         "codes in a user turn"),
        ("nothing learned", _conv("l", U, {"role": "assistant", "content": "x", "learn": False}),
         "no learned assistant turn"),
        ("learn on a user turn", _conv("l2", {"role": "user", "content": "x", "learn": True}, ASSIST),
         "never learned"),
        ("start >= end", _conv("m", {"role": "user", "content": [{"audio": "clips/dog.wav", "start": 1.0,
                                                                  "end": 1.0}]}, ASSIST), "inverted segment"),
        ("segment outside the file", _conv("m2", {"role": "user", "content": [{"audio": "clips/dog.wav",
                                                                               "start": 5.0}]}, ASSIST),
         "lies outside"),
        ("non-finite start", '{"id": "n", "turns": [{"role": "user", "content": [{"audio": "clips/dog.wav", '
                             '"start": NaN}]}, {"role": "assistant", "content": "x"}]}', "not a finite number"),
        ("non-finite end", '{"id": "n2", "turns": [{"role": "user", "content": [{"audio": "clips/dog.wav", '
                           '"end": Infinity}]}, {"role": "assistant", "content": "x"}]}', "not a finite number"),
        ("malformed JSON", '{"id": "o", "turns": [', "malformed JSON"),
        ("no id", {"turns": [U, ASSIST]}, "missing field 'id'"),
        ("duplicate id", _conv("dog-001", U, ASSIST), "duplicate id 'dog-001' (first at conv.jsonl:1)"),
        ("adjacent heard clips", _conv("p0", {"role": "user", "content": [{"audio": "clips/dog.wav"},
                                                                           {"audio": "clips/dog.wav"}]}, ASSIST),
         "turns[0].content[1]: a heard clip right after another"),
        ("rich caption field", _conv("p", U, {"role": "assistant", "content": [{"rich_caption": {"keyword": []}}]}),
         "unknown key 'keyword'"),
    ]
    lines = [GOOD_CONV] + [line for _, line, _ in bad_lines] + [_conv("q", U, ASSIST)]
    result = read_conversation_manifest(_write(files / "conv.jsonl", lines))
    assert [r.id for r in result.records] == ["dog-001", "q"]
    assert [r.source for r in result.records] == ["conv.jsonl:1", f"conv.jsonl:{len(lines)}"]
    assert len(result.records) + len(result.rejects) == len(lines)
    assert len(result.rejects) == len(bad_lines)
    for k, ((name, _, expected), reject) in enumerate(zip(bad_lines, result.rejects)):
        assert reject.source == f"conv.jsonl:{k + 2}", name
        assert expected in reject.reason, (name, reject.reason)


def test_rejected_ids_are_not_taken(files):
    lines = [_conv("x", {"role": "robot", "content": "x"}, ASSIST), _conv("x", U, ASSIST), _conv("x", U, ASSIST)]
    result = read_conversation_manifest(_write(files / "c.jsonl", lines))
    assert [r.source for r in result.records] == ["c.jsonl:2"]
    assert [r.source for r in result.rejects] == ["c.jsonl:1", "c.jsonl:3"]
    assert "first at c.jsonl:2" in result.rejects[1].reason


def test_check_audio_off_skips_file_checks(files):
    lines = [_conv("e", {"role": "user", "content": [{"audio": "clips/none.wav"}]}, ASSIST)]
    assert len(read_conversation_manifest(_write(files / "c.jsonl", lines), check_audio=False).records) == 1


PROMPT = [{"role": "system", "content": "You are UALM."}, {"role": "user", "content": "A dog barks."}]


def _pair(i: str, chosen, rejected, prompt=None, **extra) -> dict:
    return {"id": i, "prompt": PROMPT if prompt is None else prompt, "chosen": chosen, "rejected": rejected,
            **extra}


def test_preference_records_and_rejects(files):
    scores = {"chosen": {"clap": 0.4}, "rejected": {"clap": 0.1}}
    good = _pair("pair-17", [{"audio": "clips/dog.wav"}], [{"codes": "clips/good.npy"}], scores=scores)
    bad_lines = [
        ("prompt ends with the assistant", _pair("a", "x", "y", prompt=PROMPT + [ASSIST]),
         "last turn is a assistant turn, expected a user turn"),
        ("identical", _pair("b", [{"text": "same"}], "same"), "chosen and rejected are identical: nothing to prefer"),
        ("identical audio", _pair("b2", [{"audio": "clips/dog.wav"}], [{"audio": "clips/dog.wav", "start": 0}]),
         "identical"),
        ("duplicate id", _pair("pair-17", "x", "y"), "duplicate id 'pair-17' (first at pairs.jsonl:1)"),
        ("codes in the prompt",
         _pair("c", "x", "y", prompt=[{"role": "user", "content": [{"codes": "clips/good.npy"}]}]),
         "codes in a user turn"),
        ("no chosen", {"id": "d", "prompt": PROMPT, "rejected": "y"}, "missing field 'chosen'"),
        ("empty prompt", _pair("e", "x", "y", prompt=[]), "non-empty list of turns"),
        ("learned prompt turn", _pair("f", "x", "y", prompt=[U, {**ASSIST, "learn": True}, U]),
         "prompt turns are never learned"),
        ("bad chosen audio", _pair("g", [{"audio": "clips/nan.wav"}], "y"), "non-finite samples"),
        ("bad rejected codes", _pair("h", "x", [{"codes": "clips/range.npy"}]), "rejected[0]: codes file"),
        ("bad chosen part", _pair("i", [{"audio": "clips/dog.wav", "end": -1}], "y"), "inverted segment"),
    ]
    lines = [good] + [line for _, line, _ in bad_lines]
    result = read_preference_manifest(_write(files / "pairs.jsonl", lines))
    assert len(result.records) + len(result.rejects) == len(lines) == len(bad_lines) + 1
    (r,) = result.records
    assert r.id == "pair-17" and r.source == "pairs.jsonl:1" and r.scores == scores
    assert [t.role for t in r.prompt] == ["system", "user"] and not any(t.learn for t in r.prompt)
    assert r.chosen == (AudioRef(files / "clips" / "dog.wav"),)
    assert r.rejected == (CodesRef(files / "clips" / "good.npy"),)
    for k, ((name, _, expected), reject) in enumerate(zip(bad_lines, result.rejects)):
        assert reject.source == f"pairs.jsonl:{k + 2}", name
        assert expected in reject.reason, (name, reject.reason)


def test_a_clip_is_probed_once(files, monkeypatch):
    import ualm_nemo.data.conversation as conversation

    calls = []
    real = conversation._probe_audio
    monkeypatch.setattr(conversation, "_probe_audio", lambda *a, **k: calls.append(a) or real(*a, **k))
    read_conversation_manifest(_write(files / "c.jsonl", [GOOD_CONV]))
    assert len(calls) == 2  # dog.wav whole (written) and dog.wav[0, 2] (heard) are two segments, each probed once
