"""examples/chat.py end to end on an exported tiny UALM (random weights, audio input on): understanding, scripted
and interactive chat, enrichment and self-reflection, transcripts with their audio (one folder per run, saved as
the session goes), refused turns, and clear errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import soundfile

from ualm_nemo.testing.eval_sets import write_unusable_clips
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


def _session(out: Path) -> Path:
    """The one run folder under ``out`` (each run writes into a new one)."""
    [folder] = out.iterdir()
    return folder


def _error(world, capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exc:
        _run(world, *args)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_understand_answers_in_text(world, tmp_path, capsys):
    code, out = _run(world, "understand", "--audio", str(world / "tone.wav"), "--question", "What is it?",
                     "--out-dir", str(tmp_path), capsys=capsys)
    assert code == 0 and "transcript:" in out
    transcript = json.loads((_session(tmp_path) / "transcript.json").read_text())
    assert [s["role"] for s in transcript["steps"]] == ["user", "assistant"]
    assert transcript["steps"][0]["audio_in"] == [str(world / "tone.wav")]
    assert "audio" not in transcript["steps"][1]  # understanding answers in text


def test_scripted_and_interactive_chat(world, tmp_path, capsys, monkeypatch):
    code, _ = _run(world, "chat", "--codec", str(world / "codec"), "--say", "hello", "--say", "make a beep",
                   "--out-dir", str(tmp_path / "scripted"), capsys=capsys)
    steps = json.loads((_session(tmp_path / "scripted") / "transcript.json").read_text())["steps"]
    assert code == 0 and [s["role"] for s in steps] == ["user", "assistant"] * 2
    assert [s["text"] for s in steps[::2]] == ["hello", "make a beep"]
    monkeypatch.setattr("sys.stdin", io.StringIO(f"/audio {world / 'tone.wav'}\nwhat is this\n\nthanks\n/quit\n"))
    code, out = _run(world, "chat", "--out-dir", str(tmp_path / "typed"), capsys=capsys)
    steps = json.loads((_session(tmp_path / "typed") / "transcript.json").read_text())["steps"]
    assert code == 0 and [s["text"] for s in steps if s["role"] == "user"] == ["what is this", "thanks"]
    assert steps[0]["audio_in"] == [str(world / "tone.wav")] and "assistant:" in out


def test_self_reflection_keeps_every_step(world, tmp_path, capsys):
    code, _ = _run(world, "reflect", "--codec", str(world / "codec"), "--prompt", "a busy street",
                   "--out-dir", str(tmp_path), capsys=capsys)
    transcript = json.loads((_session(tmp_path) / "transcript.json").read_text())
    names = [s["step"] for s in transcript["steps"] if s["role"] == "assistant"]
    assert code == 0 and names == ["plan", "audio", "listen", "critique", "refined audio"]
    by_name = {(s["role"], s["step"]): s for s in transcript["steps"]}
    for key in (("assistant", "audio"), ("user", "listen"), ("assistant", "refined audio")):
        clip = by_name[key]["audio"][0]  # the generated clip, and the same clip as the model heard it
        wav, rate = soundfile.read(_session(tmp_path) / clip["file"])
        assert rate == 16000 and len(wav) == clip["frames"] * 320 and 4 <= clip["frames"] <= 12
    assert transcript["prompt"] == "a busy street"


def test_scripted_enrichment_of_several_prompts(world, tmp_path, capsys):
    script = tmp_path / "session.json"
    script.write_text(json.dumps({"mode": "enrich", "prompts": ["spooky", "calm sea"]}))
    code, out = _run(world, "script", "--script", str(script), "--codec", str(world / "codec"),
                     "--out-dir", str(tmp_path / "out"), capsys=capsys)
    assert code == 0
    for k in range(2):
        steps = json.loads((_session(tmp_path / "out") / f"transcript_{k:03d}.json").read_text())["steps"]
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


def test_a_bad_scripted_turn_stops_the_session_with_what_was_made_kept(world, tmp_path, capsys):
    """Turn 2 names a missing file: turn 1's text, audio and transcript are on disk, exit code 1, one line."""
    script = tmp_path / "session.json"
    script.write_text(json.dumps({"mode": "chat", "turns": [
        {"text": "make a beep"}, {"text": "and this?", "audio": [str(tmp_path / "missing.wav")]}, {"text": "3"}]}))
    code, _ = _run(world, "script", "--script", str(script), "--codec", str(world / "codec"), "--out-dir",
                   str(tmp_path / "out"))
    err = capsys.readouterr().err
    transcript = json.loads((_session(tmp_path / "out") / "transcript.json").read_text())
    assert code == 1 and [s["text"] for s in transcript["steps"] if s["role"] == "user"] == ["make a beep"]
    assert transcript["refused"] == [{"turn": 2, "reason": transcript["refused"][0]["reason"]}]
    assert "cannot read audio" in transcript["refused"][0]["reason"] and "missing.wav" in err
    assert [line for line in err.splitlines() if "refused" in line] == [f"chat: turn 2 refused: "
                                                                        f"{transcript['refused'][0]['reason']}"]
    code, _ = _run(world, "chat", "--say", "", "--out-dir", str(tmp_path / "out"))  # an empty turn
    assert code == 1 and "empty turn" in capsys.readouterr().err
    assert len(list((tmp_path / "out").iterdir())) == 2  # each run in its own folder: nothing overwritten


def test_interactive_chat_refuses_bad_turns_and_goes_on(world, tmp_path, capsys, monkeypatch):
    clips = write_unusable_clips(tmp_path)
    lines = ["hello", f"/audio {tmp_path / 'missing.wav'}", "what is this", f"/audio {clips['nan']}", "and this",
             f"/audio {clips['short']}", "and this", "z" * 100_000, "thanks", "/quit"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    code, _ = _run(world, "chat", "--out-dir", str(tmp_path / "typed"))
    err = capsys.readouterr().err
    transcript = json.loads((_session(tmp_path / "typed") / "transcript.json").read_text())
    assert code == 0 and [s["text"] for s in transcript["steps"] if s["role"] == "user"] == ["hello", "thanks"]
    reasons = [r["reason"] for r in transcript["refused"]]
    assert [r["turn"] for r in transcript["refused"]] == [2, 3, 4, 5]
    for reason, words in zip(reasons, ("cannot read audio", "NaN", "too short (160 samples", "prompt too long")):
        assert words in reason
    assert len([line for line in err.splitlines() if "refused" in line]) == 4 and "Traceback" not in err


def test_unusable_audio_and_script_files_are_one_line(world, tmp_path, capsys):
    clips, out = write_unusable_clips(tmp_path), str(tmp_path / "never")
    for name, words in (("nan", "NaN"), ("short", "too short"), ("empty", "too short (0 samples")):
        assert words in _error(world, capsys, "understand", "--audio", str(clips[name]), "--question", "q",
                               "--out-dir", out)
    latin = tmp_path / "latin.json"
    latin.write_bytes('{"mode": "chat", "turns": [{"text": "caf\u00e9"}]}'.encode("latin-1"))
    assert "utf-8" in _error(world, capsys, "script", "--script", str(latin), "--out-dir", out)
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps({"mode": "chat", "turns": ["just a string"]}))
    assert "turn 0 must be" in _error(world, capsys, "script", "--script", str(odd), "--out-dir", out)
    assert "prompt too long" in _error(world, capsys, "understand", "--audio", str(world / "tone.wav"),
                                       "--question", "z" * 100_000, "--out-dir", out)
    assert "context limit of 40" in _error(world, capsys, "understand", "--audio", str(world / "tone.wav"),
                                           "--question", "what is it?", "--max-context", "40", "--out-dir", out)
    assert "--max-context 0: must be >= 1" in _error(world, capsys, "chat", "--say", "x", "--max-context", "0",
                                                     "--out-dir", out)
    assert not Path(out).exists()


def test_a_transcript_saved_as_it_goes_writes_each_clip_once(tmp_path):
    """chat saves after every turn: the json always lists every clip made so far, each wav written once."""
    import torch

    from ualm_nemo.inference.pipeline import ReplyAudio
    from ualm_nemo.inference.transcript import Step, Transcript

    def clip(value: float) -> ReplyAudio:
        return ReplyAudio(torch.zeros(5, 8, dtype=torch.long), torch.full((1, 1600), value), 16000)

    transcript = Transcript("dialogue")
    transcript.add(Step("assistant", "turn 1", audio=[clip(0.1)]))
    path = transcript.save(tmp_path)
    first = tmp_path / json.loads(path.read_text())["steps"][0]["audio"][0]["file"]
    first.write_bytes(b"kept")  # a rewrite would replace it
    transcript.add(Step("assistant", "turn 2", audio=[clip(0.2)]))
    files = [s["audio"][0]["file"] for s in json.loads(transcript.save(tmp_path).read_text())["steps"]]
    assert first.read_bytes() == b"kept" and soundfile.read(tmp_path / files[1])[0][0] == pytest.approx(0.2, abs=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, *files])  # no temporary files left


def test_the_enhancer_writes_48k_stereo_and_the_transcript_says_so(world, tiny_enhancer, tmp_path, capsys,
                                                                    monkeypatch):
    """--enhancer: every clip of a mode that writes audio is 48 kHz stereo, the transcript records the format;
    a bad --enhancer (or one without --codec) is one line, before any folder is made."""
    code, _ = _run(world, "enrich", "--codec", str(world / "codec"), "--enhancer", str(tiny_enhancer), "--prompt",
                   "calm sea", "--out-dir", str(tmp_path / "enrich"), capsys=capsys)
    transcript = json.loads((_session(tmp_path / "enrich") / "transcript.json").read_text())
    assert code == 0 and transcript["audio_format"] == {"sample_rate": 48000, "channels": 2,
                                                        "enhancer": str(tiny_enhancer.resolve())}
    [clip] = [a for s in transcript["steps"] for a in s.get("audio", [])]
    wav, rate = soundfile.read(_session(tmp_path / "enrich") / clip["file"], always_2d=True)
    assert rate == clip["sample_rate"] == 48000 and wav.shape == (3 * 320 * clip["frames"], 2)
    monkeypatch.setattr("sys.stdin", io.StringIO("/quit\n"))  # a chat session records it from the start
    code, _ = _run(world, "chat", "--codec", str(world / "codec"), "--enhancer", str(tiny_enhancer),
                   "--out-dir", str(tmp_path / "chat"), capsys=capsys)
    chat = json.loads((_session(tmp_path / "chat") / "transcript.json").read_text())
    assert code == 0 and chat["audio_format"]["sample_rate"] == 48000
    out = str(tmp_path / "never")
    assert "--enhancer: cannot load" in _error(world, capsys, "enrich", "--codec", str(world / "codec"),
                                               "--enhancer", str(tmp_path / "nope"), "--prompt", "x", "--out-dir", out)
    assert "--enhancer needs --codec" in _error(world, capsys, "chat", "--enhancer", str(tiny_enhancer), "--say", "x",
                                                "--out-dir", out)
    assert not Path(out).exists()
