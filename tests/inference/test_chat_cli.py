"""examples/chat.py end to end on an exported tiny UALM (random weights, audio input on): understanding, scripted
and interactive chat, enrichment and self-reflection, transcripts with their audio, and clear errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import soundfile

from ualm_nemo.testing.examples import load_example



@pytest.fixture(scope="module")
def world(tiny_export):
    root = tiny_export["root"]
    (root / "broken.wav").write_text("not audio")
    return root


def _run(world, *args: str, capsys=None) -> tuple[int, str]:
    defaults = ["--checkpoint", str(world / "hf"), "--max-frames", "12", "--min-frames", "4", "--max-text-tokens", "6"]
    code = load_example("chat").main([args[0], *defaults, *args[1:]])  # later flags win: the test's own come last
    return code, capsys.readouterr().out if capsys else ""


def _error(world, capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exc:
        _run(world, *args)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_understand_answers_in_text(world, tmp_path, capsys):
    code, out = _run(world, "understand", "--audio", str(world / "tone.wav"), "--question", "What is it?",
                     "--out-dir", str(tmp_path), capsys=capsys)
    assert code == 0 and "transcript:" in out
    transcript = json.loads((tmp_path / "transcript.json").read_text())
    assert [s["role"] for s in transcript["steps"]] == ["user", "assistant"]
    assert transcript["steps"][0]["audio_in"] == [str(world / "tone.wav")]
    assert "audio" not in transcript["steps"][1]  # understanding answers in text


def test_scripted_and_interactive_chat(world, tmp_path, capsys, monkeypatch):
    code, _ = _run(world, "chat", "--codec", str(world / "codec"), "--say", "hello", "--say", "make a beep",
                   "--out-dir", str(tmp_path / "scripted"), capsys=capsys)
    steps = json.loads((tmp_path / "scripted" / "transcript.json").read_text())["steps"]
    assert code == 0 and [s["role"] for s in steps] == ["user", "assistant"] * 2
    assert [s["text"] for s in steps[::2]] == ["hello", "make a beep"]
    monkeypatch.setattr("sys.stdin", io.StringIO(f"/audio {world / 'tone.wav'}\nwhat is this\n\nthanks\n/quit\n"))
    code, out = _run(world, "chat", "--out-dir", str(tmp_path / "typed"), capsys=capsys)
    steps = json.loads((tmp_path / "typed" / "transcript.json").read_text())["steps"]
    assert code == 0 and [s["text"] for s in steps if s["role"] == "user"] == ["what is this", "thanks"]
    assert steps[0]["audio_in"] == [str(world / "tone.wav")] and "assistant:" in out


def test_self_reflection_keeps_every_step(world, tmp_path, capsys):
    code, _ = _run(world, "reflect", "--codec", str(world / "codec"), "--prompt", "a busy street",
                   "--out-dir", str(tmp_path), capsys=capsys)
    transcript = json.loads((tmp_path / "transcript.json").read_text())
    names = [s["step"] for s in transcript["steps"] if s["role"] == "assistant"]
    assert code == 0 and names == ["plan", "audio", "listen", "critique", "refined audio"]
    by_name = {(s["role"], s["step"]): s for s in transcript["steps"]}
    for key in (("assistant", "audio"), ("user", "listen"), ("assistant", "refined audio")):
        clip = by_name[key]["audio"][0]  # the generated clip, and the same clip as the model heard it
        wav, rate = soundfile.read(tmp_path / clip["file"])
        assert rate == 16000 and len(wav) == clip["frames"] * 320 and 4 <= clip["frames"] <= 12
    assert transcript["prompt"] == "a busy street"


def test_scripted_enrichment_of_several_prompts(world, tmp_path, capsys):
    script = tmp_path / "session.json"
    script.write_text(json.dumps({"mode": "enrich", "prompts": ["spooky", "calm sea"]}))
    code, out = _run(world, "script", "--script", str(script), "--codec", str(world / "codec"),
                     "--out-dir", str(tmp_path / "out"), capsys=capsys)
    assert code == 0
    for k in range(2):
        steps = json.loads((tmp_path / "out" / f"transcript_{k:03d}.json").read_text())["steps"]
        assert [s["step"] for s in steps] == ["plan", "plan", "audio", "audio"]
        assert "spooky" in steps[0]["text"] if k == 0 else "calm sea" in steps[0]["text"]


def test_bad_input_is_one_clear_line(world, tmp_path, capsys):
    out = str(tmp_path / "never")
    assert "cannot read audio" in _error(world, capsys, "understand", "--audio", str(world / "broken.wav"),
                                         "--question", "q", "--out-dir", out)
    assert "--question" in _error(world, capsys, "understand", "--audio", str(world / "tone.wav"), "--out-dir", out)
    assert "--codec" in _error(world, capsys, "reflect", "--prompt", "x", "--out-dir", out)
    assert "--cfg-scale" in _error(world, capsys, "chat", "--say", "x", "--cfg-scale", "nan", "--out-dir", out)
    assert "--max-frames" in _error(world, capsys, "chat", "--say", "x", "--max-frames", "0", "--out-dir", out)
    assert "--prompt" in _error(world, capsys, "enrich", "--codec", str(world / "codec"), "--out-dir", out)
    bad = tmp_path / "bad.json"
    bad.write_text('{"mode": "chat"}')
    assert "turns" in _error(world, capsys, "script", "--script", str(bad), "--out-dir", out)
    with pytest.raises(SystemExit):
        load_example("chat").main(["chat", "--checkpoint", str(tmp_path / "missing"), "--say", "x", "--out-dir", out])
    assert "no such checkpoint" in capsys.readouterr().err
    assert not Path(out).exists()  # nothing half-written
