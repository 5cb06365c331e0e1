"""Raw manifests -> prepared cuts -> Shar shards: counts and rejects, bit-exact round trips, resumable split stage."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from ualm_nemo.data.tokenize_stage import (count_cuts, iter_shard_cuts, num_shards, select_shards, tokenize_shard,
                                            tokenize_source)
from ualm_nemo.codec.xcodec import CodecTokenizer, build_tiny_xcodec, num_codec_frames
from ualm_nemo.data.cuts import cut_turns, cut_waveform, prepare_source, read_manifest
from ualm_nemo.data.raw import load_audio
from ualm_nemo.data.shar import ShardReader, read_rejects, read_shar, shard_counts, shard_done


def _wav(path, seconds=0.5, sr=16000, channels=1):
    t = np.arange(round(seconds * sr)) / sr
    x = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    sf.write(str(path), np.stack([x, -x], 1) if channels == 2 else x, sr)


def _tta(location, **kw):
    e = {"location": location, "start_time": 0.0, "end_time": 0.5, "duration": 0.5, "caption": "a tone",
         "sample_rate": 16000, **kw}
    return json.dumps({k: v for k, v in e.items() if v is not None})


@pytest.fixture()
def bad_manifests(tmp_path):
    """One manifest per task, each mixing valid entries with every kind of bad entry of that format."""
    _wav(tmp_path / "good.wav")
    _wav(tmp_path / "stereo44k.wav", seconds=0.8, sr=44100, channels=2)
    _wav(tmp_path / "sr22k.wav", sr=22050)
    sf.write(str(tmp_path / "empty.wav"), np.zeros(0, dtype=np.float32), 16000)
    (tmp_path / "garbage.wav").write_bytes(b"not audio")
    tta = [_tta("good.wav"), _tta("missing.wav"), '{"location": ', _tta("good.wav", caption=None),
           _tta("empty.wav"), _tta("sr22k.wav"), _tta("good.wav", start_time=0.4, end_time=0.4),
           _tta("good.wav", start_time=0.2, end_time=2.0), _tta("garbage.wav"), _tta("good.wav", sample_rate="x"),
           _tta("stereo44k.wav", start_time=0.1, end_time=0.7, sample_rate=44100)]
    (tmp_path / "tta.jsonl").write_text("\n".join(tta) + "\n")
    conv = [{"from": "human", "value": "<sound>\nWhat?"}, {"from": "gpt", "value": "A tone."}]
    und = [{"id": "ok", "sound": "good.wav", "conversations": conv}, {"id": "x", "sound": "nope.wav",
           "conversations": conv}, {"id": "y", "sound": "good.wav"}, "not an object",
           {"id": "st", "sound": "stereo44k.wav", "conversations": conv}]
    (tmp_path / "und.json").write_text(json.dumps(und))
    text = [json.dumps({"input": [{"role": "user", "content": "1+1?"}], "output": "2"}), "{bad",
            json.dumps({"input": [{"role": "robot", "content": "q"}], "output": "a"})]
    (tmp_path / "text.jsonl").write_text("\n".join(text) + "\n")
    return {"tta": tmp_path / "tta.jsonl", "understanding": tmp_path / "und.json", "text": tmp_path / "text.jsonl"}


def test_prepare_counts_rejects_and_keeps_every_valid_record(bad_manifests, tmp_path):
    expected = {"tta": (2, 9), "understanding": (2, 3), "text": (1, 2)}
    for task, manifest in bad_manifests.items():
        report = prepare_source(task, manifest, tmp_path / "prep" / task)
        assert (report.num_records, report.num_rejects) == expected[task], task
        raw = read_manifest(task, manifest)
        rejects = [json.loads(line) for line in (tmp_path / "prep" / task / "rejects.jsonl").read_text().splitlines()]
        assert rejects == [{"source": r.source, "reason": r.reason} for r in raw.rejects]
        assert all(r["reason"] for r in rejects)
        summary = json.loads((tmp_path / "prep" / task / "summary.json").read_text())
        assert summary["num_records"] + summary["num_rejects"] == sum(expected[task])
        assert count_cuts(tmp_path / "prep" / task / "cuts.jsonl.gz") == len(raw.records)


def test_prepared_audio_matches_raw_loader(bad_manifests, tmp_path):
    """Segment, resample (44.1 kHz stereo -> 16 kHz mono) and downmix agree with raw.load_audio."""
    prepare_source("tta", bad_manifests["tta"], tmp_path / "p")
    records = read_manifest("tta", bad_manifests["tta"]).records
    cuts = list(iter_shard_cuts(tmp_path / "p" / "cuts.jsonl.gz", 100, [0]))[0][1]
    for rec, cut in zip(records, cuts, strict=True):
        ref = load_audio(rec.audio_path, rec.start, rec.end)
        got = cut_waveform(cut)
        assert cut.sampling_rate == 16000 and abs(got.shape[0] - ref.shape[0]) <= 1
        n = min(got.shape[0], ref.shape[0])
        assert float((got[:n] - ref[:n]).abs().max()) < 2e-2  # two resamplers, same signal


def test_round_trip_is_bit_exact_with_the_tiny_codec(bad_manifests, tmp_path):
    prepare_source("tta", bad_manifests["tta"], tmp_path / "p")
    codec = CodecTokenizer(build_tiny_xcodec(seed=0))
    report = tokenize_source(tmp_path / "p" / "cuts.jsonl.gz", tmp_path / "s", codec, shard_size=1, progress=False)
    assert report.num_cuts == 2 and report.shards_written == [0, 1] and report.audio_seconds > 0
    prepared = [c for _, cs in iter_shard_cuts(tmp_path / "p" / "cuts.jsonl.gz", 1, [0, 1]) for c in cs]
    stored = list(read_shar(tmp_path / "s"))  # lhotse's own reader
    reader = ShardReader(tmp_path / "s")
    for k, (src, lh) in enumerate(zip(prepared, stored, strict=True)):
        wav = cut_waveform(src)
        codes = codec.encode([wav])[0]
        mine = reader.get(k, 0)
        for cut in (lh, mine):
            tokens = cut.load_codec_tokens()
            assert tokens.dtype == np.int16 and tokens.shape == (num_codec_frames(wav.shape[0]), 8)
            assert np.array_equal(tokens, codes.numpy())
            assert cut.custom["caption"] == src.custom["caption"] and cut.custom["task"] == "tta"
            audio = cut.load_audio()
            assert audio.shape == (1, wav.shape[0]) and np.abs(audio[0] - wav.numpy()).max() < 1e-4  # flac 16 bit


def test_captions_and_conversations_round_trip(shar_sources):
    for task in ("understanding", "text", "tta"):
        prepared = [c for _, cs in iter_shard_cuts(
            shar_sources[task].replace("/shar/", "/prepared/") + "/cuts.jsonl.gz", 10**6, [0]) for c in cs]
        stored = {c.id: c for c in read_shar(shar_sources[task])}
        assert set(stored) == {c.id for c in prepared}
        for src in prepared:
            got = stored[src.id]
            assert got.custom["task"] == task
            if task == "tta":
                assert got.custom["caption"] == src.custom["caption"]
            else:
                assert cut_turns(got) == cut_turns(src) and got.custom["conversation"] == src.custom["conversation"]
            assert got.has_recording == (task != "text")


def test_stage_splits_by_shard_and_resumes(bad_manifests, tmp_path, monkeypatch):
    from ualm_nemo.testing.fake_codec import HashCodec

    for i in range(4):  # 4 more valid entries: 6 cuts in shards of 2
        _wav(tmp_path / f"g{i}.wav", seconds=0.3 + 0.1 * i)
    with open(bad_manifests["tta"], "a") as f:
        f.writelines(_tta(f"g{i}.wav", end_time=0.3) + "\n" for i in range(4))
    prepare_source("tta", bad_manifests["tta"], tmp_path / "p")
    cuts = tmp_path / "p" / "cuts.jsonl.gz"
    assert num_shards(count_cuts(cuts), 2) == 3
    assert select_shards(3, rank=1, world=2) == [1] and select_shards(3, shard_range=(1, 9)) == [1, 2]
    whole = tokenize_source(cuts, tmp_path / "one", HashCodec(), shard_size=2, progress=False)
    a = tokenize_source(cuts, tmp_path / "two", HashCodec(), shard_size=2, shards=select_shards(3, rank=0, world=2),
                        progress=False)
    b = tokenize_source(cuts, tmp_path / "two", HashCodec(), shard_size=2, shards=select_shards(3, rank=1, world=2),
                        progress=False)
    assert whole.shards_written == [0, 1, 2] and a.shards_written == [0, 2] and b.shards_written == [1]
    one, two = list(read_shar(tmp_path / "one")), list(read_shar(tmp_path / "two"))
    assert [c.id for c in one] == [c.id for c in two]
    for x, y in zip(one, two):
        assert np.array_equal(x.load_codec_tokens(), y.load_codec_tokens())
    assert shard_counts(tmp_path / "one") == {0: 2, 1: 2, 2: 2}

    # a re-run skips finished shards; an unfinished shard (no meta) is redone
    (tmp_path / "one" / "meta" / "000001.json").unlink()
    calls: list[int] = []
    encode = HashCodec.encode
    monkeypatch.setattr(HashCodec, "encode", lambda self, wavs: calls.append(len(wavs)) or encode(self, wavs))
    again = tokenize_source(cuts, tmp_path / "one", HashCodec(), shard_size=2, progress=False)
    assert again.shards_skipped == [0, 2] and again.shards_written == [1]
    assert shard_done(tmp_path / "one", 1) and calls == [2]


def test_stage_rejects_audio_broken_after_preparation(bad_manifests, tmp_path):
    from ualm_nemo.testing.fake_codec import HashCodec

    prepare_source("understanding", bad_manifests["understanding"], tmp_path / "p")
    (tmp_path / "stereo44k.wav").write_bytes(b"corrupted later")
    report = tokenize_source(tmp_path / "p" / "cuts.jsonl.gz", tmp_path / "s", HashCodec(), shard_size=10,
                             progress=False)
    assert (report.num_cuts, report.num_rejects) == (1, 1)
    rejects = read_rejects(tmp_path / "s")
    assert len(rejects) == 1 and "audio failed to load" in rejects[0]["reason"] and rejects[0]["origin"] == "st"
    assert [c.custom["origin"] for c in read_shar(tmp_path / "s")] == ["ok"]


def test_stage_refuses_mixed_tasks_and_missing_codec(shar_sources, tmp_path):
    root = shar_sources["tta"].replace("/shar/tta", "/prepared")
    tta = list(iter_shard_cuts(f"{root}/tta/cuts.jsonl.gz", 2, [0]))[0][1]
    text = list(iter_shard_cuts(f"{root}/text/cuts.jsonl.gz", 2, [0]))[0][1]
    with pytest.raises(ValueError, match="one task"):
        tokenize_shard(tta + text, None, ("tta",))
    with pytest.raises(ValueError, match="need a codec"):
        tokenize_shard(tta, None, ("tta",))
    ready, rejects, fields, _ = tokenize_shard(text, None, ("tta",))
    assert fields == {} and rejects == [] and len(ready) == 2


def test_reader_refuses_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenize_audio"):
        shard_counts(tmp_path)
