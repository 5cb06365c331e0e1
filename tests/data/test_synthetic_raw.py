"""Synthetic demo data round trip, raw readers (one reject per bad-input kind), and audio loading."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from ualm_nemo.data.raw import (AUDIO_TAG, TextRecord, TTARecord, UnderstandingRecord, load_audio,
                                read_text_manifest, read_tta_manifest, read_understanding_manifest)
from ualm_nemo.data.synthetic import SOUND_CLASSES, synthesize_demo_data


def _wav(path, seconds: float = 1.0, sr: int = 16000, freq: float = 440.0, channels: int = 1):
    t = np.arange(round(seconds * sr)) / sr
    x = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    sf.write(str(path), np.stack([x] * channels, axis=1) if channels > 1 else x, sr)
    return path


def _spectral_centroid(wav: torch.Tensor) -> float:
    mag = torch.fft.rfft(wav).abs()
    freqs = torch.fft.rfftfreq(wav.shape[0], 1 / 16000)
    return float((mag * freqs).sum() / mag.sum())


# ---------------------------------------------------------------- synthetic data


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, synthesize_demo_data(out, num_tta=12, num_understanding=8, num_text=6, seed=0)


def test_synthetic_round_trip(demo):
    out, paths = demo
    assert set(paths) == {"tta", "understanding", "text"} and all(p.is_file() for p in paths.values())
    tta, und, text = (read_tta_manifest(paths["tta"]), read_understanding_manifest(paths["understanding"]),
                      read_text_manifest(paths["text"]))
    assert (len(tta.records), len(und.records), len(text.records)) == (12, 8, 6)
    assert tta.rejects == und.rejects == text.rejects == []
    for r in tta.records:
        assert r.audio_path.is_file() and sf.info(str(r.audio_path)).samplerate == 16000
        assert 1.0 <= r.end - r.start <= 3.0 and r.caption in SOUND_CLASSES
        wav = load_audio(r.audio_path, r.start, r.end)
        assert wav.shape[0] == round((r.end - r.start) * 16000) and float(wav.abs().max()) > 0.1
    assert any(r.start > 0 for r in tta.records)  # some segments sit inside longer files
    assert {r.caption for r in tta.records} == set(SOUND_CLASSES)  # 12 clips: every class, balanced
    for r in und.records:
        assert r.turns[0][0] == "user" and r.turns[0][1].startswith(AUDIO_TAG) and r.turns[1][0] == "assistant"
    assert any(len(r.turns) == 4 for r in und.records)  # multi-turn dialogues present
    assert all(r.turns[-1][0] == "assistant" for r in text.records)


def _flatness(wav: torch.Tensor) -> float:
    """Geometric / arithmetic mean of the magnitude spectrum: ~0.85 for white noise, ~0 for a tone."""
    mag = torch.fft.rfft(wav).abs() + 1e-9
    return float(mag.log().mean().exp() / mag.mean())


def test_synthetic_sounds_differ_by_caption(demo):
    """Each caption's audio has the property its caption names (pitch, noisiness, rising pitch, impulses)."""
    _, paths = demo
    for r in read_tta_manifest(paths["tta"]).records:
        wav = load_audio(r.audio_path, r.start, r.end)
        half = wav.shape[0] // 2
        centroid, flatness = _spectral_centroid(wav), _flatness(wav)
        if r.caption == "a low hum":
            assert centroid < 600 and flatness < 0.1
        elif r.caption == "a high beep":
            assert centroid > 1400 and flatness < 0.1
        elif r.caption == "white noise":
            assert flatness > 0.7
        elif r.caption == "clicks":
            assert 0.2 < flatness < 0.7
        else:
            assert r.caption == "a rising chirp"
            assert _spectral_centroid(wav[half:]) > 2 * _spectral_centroid(wav[:half])


def test_synthetic_is_deterministic(tmp_path):
    a = synthesize_demo_data(tmp_path / "a", num_tta=3, num_understanding=2, num_text=3, seed=7)
    b = synthesize_demo_data(tmp_path / "b", num_tta=3, num_understanding=2, num_text=3, seed=7)
    c = synthesize_demo_data(tmp_path / "c", num_tta=3, num_understanding=2, num_text=3, seed=8)
    for kind in a:
        assert a[kind].read_text() == b[kind].read_text()
    assert a["tta"].read_text() != c["tta"].read_text()
    for wav in (tmp_path / "a" / "audio").iterdir():
        assert wav.read_bytes() == (tmp_path / "b" / "audio" / wav.name).read_bytes()


# ---------------------------------------------------------------- rejects


def _tta_line(location: str, **kw) -> str:
    entry = {"location": location, "start_time": 0.0, "end_time": 0.5, "duration": 0.5, "caption": "a tone",
             "sample_rate": 16000, **kw}
    return json.dumps({k: v for k, v in entry.items() if v is not None})


def test_tta_rejects_each_bad_kind(tmp_path):
    _wav(tmp_path / "good.wav")
    _wav(tmp_path / "sr22k.wav", sr=22050)
    sf.write(str(tmp_path / "empty.wav"), np.zeros(0, dtype=np.float32), 16000)
    (tmp_path / "garbage.wav").write_bytes(b"not audio at all")
    lines = [
        _tta_line("good.wav"),
        _tta_line("missing.wav"),
        '{"location": "good.wav", "start_time": 0.0,',  # malformed JSON
        _tta_line("good.wav", caption=None),  # missing field
        _tta_line("empty.wav"),
        _tta_line("sr22k.wav"),  # manifest says 16000
        "",  # blank lines are not entries
        _tta_line("good.wav", start_time=0.5, end_time=0.5),  # empty segment
        _tta_line("good.wav", start_time=0.5, end_time=2.0),  # beyond the file
        _tta_line("garbage.wav"),
        _tta_line("good.wav", sample_rate="16k"),  # mistyped field
        _tta_line(str(tmp_path / "good.wav"), start_time=0.25, end_time=0.75),  # absolute path: fine
    ]
    (tmp_path / "tta.jsonl").write_text("\n".join(lines) + "\n")
    result = read_tta_manifest(tmp_path / "tta.jsonl")
    assert result.records == [TTARecord(tmp_path / "good.wav", 0.0, 0.5, "a tone"),
                              TTARecord(tmp_path / "good.wav", 0.25, 0.75, "a tone")]
    reasons = {r.source: r.reason for r in result.rejects}
    assert len(result.records) + len(result.rejects) == 11
    expected = {2: "not found", 3: "malformed JSON", 4: "missing field 'caption'", 5: "empty audio",
                6: "sample rate mismatch", 8: "empty or inverted segment", 9: "outside", 10: "unreadable audio",
                11: "field 'sample_rate'"}
    assert set(reasons) == {f"tta.jsonl:{line}" for line in expected}
    for line, words in expected.items():
        assert words in reasons[f"tta.jsonl:{line}"], (line, reasons[f"tta.jsonl:{line}"])


def test_non_finite_and_undecodable_input_is_rejected_at_read_time(tmp_path):
    """Issue 13, classes 1-2: NaN/inf samples (float wavs can hold them), NaN/inf numbers (json accepts them), a
    negative duration, a non-UTF-8 line: each one counted reject with its reason, every good record kept."""
    _wav(tmp_path / "good.wav")
    bad = 0.3 * np.ones(16000, dtype=np.float32)
    bad[4000] = np.nan  # inside [0, 0.5) s, outside [0.5, 1)
    sf.write(str(tmp_path / "nan.wav"), bad, 16000, subtype="FLOAT")
    bad[4000] = np.inf
    sf.write(str(tmp_path / "inf.wav"), bad, 16000, subtype="FLOAT")
    lines = [_tta_line("good.wav").encode(), _tta_line("nan.wav").encode(), _tta_line("inf.wav").encode(),
             _tta_line("good.wav").replace('"start_time": 0.0', '"start_time": NaN').encode(),
             _tta_line("good.wav").replace('"end_time": 0.5', '"end_time": Infinity').encode(),
             _tta_line("good.wav", duration=-1.0).encode(),
             _tta_line("good.wav", caption="caf\u00e9").encode().replace(b"caf\\u00e9", b"caf\xe9"),
             _tta_line("nan.wav", start_time=0.5, end_time=1.0).encode(),  # the NaN lies outside the segment
             _tta_line("good.wav", start_time=0.5, end_time=1.0).encode()]
    (tmp_path / "tta.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    result = read_tta_manifest(tmp_path / "tta.jsonl")
    assert len(result.records) + len(result.rejects) == 9
    assert [(r.audio_path.name, r.start, r.end) for r in result.records] == [
        ("good.wav", 0.0, 0.5), ("nan.wav", 0.5, 1.0), ("good.wav", 0.5, 1.0)]
    reasons = {r.source: r.reason for r in result.rejects}
    expected = {2: "non-finite samples", 3: "non-finite samples", 4: "'start_time' is nan", 5: "'end_time' is inf",
                6: "'duration' = -1.0 is not positive", 7: "not UTF-8"}
    assert set(reasons) == {f"tta.jsonl:{line}" for line in expected}
    for line, words in expected.items():
        assert words in reasons[f"tta.jsonl:{line}"], (line, reasons[f"tta.jsonl:{line}"])


def test_duplicate_understanding_ids_keep_the_first(tmp_path):
    _wav(tmp_path / "good.wav")
    bad = np.full(16000, np.nan, dtype=np.float32)
    sf.write(str(tmp_path / "nan.wav"), bad, 16000, subtype="FLOAT")
    conv = [{"from": "human", "value": "<sound>\nQ"}, {"from": "gpt", "value": "A"}]
    entries = [{"id": "a", "sound": "good.wav", "conversations": conv},
               {"id": "a", "sound": "good.wav", "conversations": conv},
               {"id": "b", "sound": "nan.wav", "conversations": conv},
               {"id": "c", "sound": "good.wav", "conversations": conv}]
    (tmp_path / "af3.json").write_text(json.dumps(entries))
    result = read_understanding_manifest(tmp_path / "af3.json")
    assert [r.id for r in result.records] == ["a", "c"]
    assert [(r.source, r.reason.split(" (")[0]) for r in result.rejects] == [
        ("af3.json[1]", "duplicate id 'a'"), ("af3.json[2]", "non-finite samples")]
    (tmp_path / "latin1.json").write_bytes(b'[{"id": "caf\xe9"}]')
    assert "not UTF-8" in read_understanding_manifest(tmp_path / "latin1.json").rejects[0].reason


def test_understanding_rejects_each_bad_kind(tmp_path):
    _wav(tmp_path / "good.wav")
    _wav(tmp_path / "short.wav", seconds=0.02)  # 320 samples: no 25 Hz encoder frame
    sf.write(str(tmp_path / "empty.wav"), np.zeros(0, dtype=np.float32), 16000)

    def conv(*values):
        return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]

    entries = [
        {"id": "ok", "sound": "good.wav", "duration": 1.0, "conversations": conv("<sound>\nWhat?", "A tone.")},
        {"id": "notag", "sound": "good.wav", "conversations": conv("What?", "A tone.")},  # tag added in front
        {"id": "missing", "sound": "nope.wav", "conversations": conv("<sound>\nQ", "A")},
        {"id": "empty", "sound": "empty.wav", "conversations": conv("<sound>\nQ", "A")},
        {"id": "nofield", "sound": "good.wav"},
        {"id": "twotags", "sound": "good.wav", "conversations": conv("<sound><sound>\nQ", "A")},
        {"id": "noanswer", "sound": "good.wav", "conversations": conv("<sound>\nQ")},
        {"id": "badrole", "sound": "good.wav", "conversations": [{"from": "bot", "value": "x"}]},
        "not an object",
        {"id": "short", "sound": "short.wav", "conversations": conv("<sound>\nQ", "A")},
    ]
    (tmp_path / "af3.json").write_text(json.dumps(entries))
    result = read_understanding_manifest(tmp_path / "af3.json")
    assert [r.id for r in result.records] == ["ok", "notag"]
    assert result.records[0] == UnderstandingRecord(tmp_path / "good.wav",
                                                    (("user", "<sound>\nWhat?"), ("assistant", "A tone.")), "ok")
    assert result.records[1].turns[0] == ("user", "<sound>\nWhat?")
    reasons = [r.reason for r in result.rejects]
    assert [r.source for r in result.rejects] == [f"af3.json[{i}]" for i in range(2, 10)]
    for reason, words in zip(reasons, ["not found", "empty audio", "missing field 'conversations'", "one <sound>",
                                       "at least one 'gpt'", "'human' or 'gpt'", "expected a JSON object",
                                       "too short"], strict=True):
        assert words in reason, (words, reason)

    (tmp_path / "broken.json").write_text('[{"id": 1,')
    broken = read_understanding_manifest(tmp_path / "broken.json")
    assert broken.records == [] and "malformed JSON" in broken.rejects[0].reason


def test_text_rejects_each_bad_kind(tmp_path):
    lines = [
        json.dumps({"input": [{"role": "user", "content": "1+1?"}], "output": "2"}),
        json.dumps({"input": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                              {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}],
                    "output": "bye"}),
        "{not json",
        json.dumps({"input": [{"role": "user", "content": "q"}]}),
        json.dumps({"input": [{"role": "robot", "content": "q"}], "output": "a"}),
        json.dumps({"input": [{"role": "user", "content": "q"}], "output": "  "}),
        json.dumps({"input": [{"role": "assistant", "content": "q"}], "output": "a"}),
    ]
    (tmp_path / "text.jsonl").write_text("\n".join(lines))
    result = read_text_manifest(tmp_path / "text.jsonl")
    assert result.records[0] == TextRecord((("user", "1+1?"), ("assistant", "2")))
    assert [role for role, _ in result.records[1].turns] == ["system", "user", "assistant", "user", "assistant"]
    for reject, words in zip(result.rejects, ["malformed JSON", "missing field 'output'", "'robot'", "is empty",
                                              "no user turn"]):
        assert words in reject.reason
    assert len(result.rejects) == 5


# ---------------------------------------------------------------- audio loading


def test_load_audio_resamples_and_downmixes(tmp_path):
    _wav(tmp_path / "a.wav", seconds=1.0, sr=24000, freq=1000.0, channels=2)
    wav = load_audio(tmp_path / "a.wav")
    assert wav.shape == (16000,) and wav.dtype == torch.float32
    spectrum = torch.fft.rfft(wav).abs()
    assert abs(int(spectrum.argmax()) - 1000) <= 1  # 1 s at 16 kHz: bin k = k Hz
    segment = load_audio(tmp_path / "a.wav", start=0.25, end=0.5)
    assert segment.shape == (4000,)
