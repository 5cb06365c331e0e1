"""SFT conversations and DPO pairs through prepare -> codec stage -> Shar -> the Shar loader: one cut per record,
the same samples as the in-memory datasets, pairs batched chosen / rejected interleaved, exact resume, refusals."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import itertools
import json
import random

import numpy as np
import pytest
import soundfile as sf
import torch

torch.set_num_threads(1)

from ualm_nemo.data.tokenize_stage import tokenize_shard, tokenize_source
from ualm_nemo.codec.xcodec import CodecTokenizer, build_tiny_xcodec, num_codec_frames
from ualm_nemo.data.conversation import read_conversation_manifest, read_preference_manifest
from ualm_nemo.data.cuts import CutClips, cut_record, prepare_source
from ualm_nemo.data.formatting import SampleFormatter, sample_clips
from ualm_nemo.data.posttrain_dataset import (ConversationDataset, FileClips, PreferenceDataset,
                                              format_conversation_record, record_length)
from ualm_nemo.data.shar import ShardReader, read_rejects, shard_counts, source_task
from ualm_nemo.data.shar_dataset import SharBatchLoader, SharLoaderConfig
from ualm_nemo.data.tokenizer import ByteChatTokenizer
from ualm_nemo.model.vocab import UnifiedVocab
from ualm_nemo.testing.batches import same_batch

V = UnifiedVocab(text_vocab_size=384)
SECONDS = {"dog": 0.3, "cat": 0.45, "bird": 0.6, "hall": 0.5}
N_CONV, N_PAIRS = 10, 8


def _fmt(cfg_dropout: float = 0.0) -> SampleFormatter:
    return SampleFormatter(ByteChatTokenizer(), V, cfg_dropout=cfg_dropout)


def _user_audio(k: int) -> list:
    clip = ["dog", "cat", "bird"][k % 3]
    return [{"text": f"Listen {k}:"}, {"audio": f"clips/{clip}.wav"}, {"text": "What is it?"}]


def _conversation(k: int) -> dict:
    kind = k % 5
    if kind == 0:  # heard, written, then the written clip heard back (self-reflection), a turn not learned
        turns = [{"role": "system", "content": "You are UALM."},
                 {"role": "user", "content": _user_audio(k)},
                 {"role": "assistant", "content": [{"text": "Here:"}, {"audio": "clips/hall.wav"}]},
                 {"role": "user", "content": [{"audio": "clips/hall.wav", "start": 0.1, "end": 0.4},
                                              {"text": "Describe it."}]},
                 {"role": "assistant", "content": "A hall.", "learn": False},
                 {"role": "user", "content": "Again, shorter."},
                 {"role": "assistant", "content": [{"audio": "clips/bird.wav", "start": 0.05, "end": 0.35}]}]
    elif kind == 1:  # written audio given as codes
        turns = [{"role": "user", "content": f"Make sound {k}."},
                 {"role": "assistant", "content": [{"codes": "clips/sampled.npy"}, {"text": "done"}]}]
    elif kind == 2:  # text only
        turns = [{"role": "user", "content": f"Say {k}."}, {"role": "assistant", "content": f"{k}!"}]
    elif kind == 3:  # two heard clips, one written segment and a 22.05 kHz written clip (resampled)
        turns = [{"role": "user", "content": _user_audio(k) + [{"audio": "clips/cat.wav"}]},
                 {"role": "assistant", "content": [{"audio": "clips/dog.wav", "start": 0.1},
                                                   {"text": "and"}, {"audio": "clips/tone22k.wav"}]}]
    else:  # written wav and codes in one turn
        turns = [{"role": "user", "content": f"Two sounds {k}."},
                 {"role": "assistant", "content": [{"audio": "clips/cat.wav"}, {"text": "then"},
                                                   {"codes": "clips/sampled.npy"}]}]
    return {"id": f"conv-{k}", "turns": turns}


def _pair(k: int) -> dict:
    prompt = [{"role": "user", "content": _user_audio(k) if k % 2 else f"Make a dog bark {k}."}]
    chosen = [{"audio": "clips/dog.wav"}] if k % 3 else [{"text": "ok"}, {"codes": "clips/sampled.npy"}]
    rejected = [{"audio": "clips/cat.wav", "end": 0.3 + 0.01 * k}]
    return {"id": f"pair-{k}", "prompt": prompt, "chosen": chosen, "rejected": rejected, "scores": {"k": k}}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("posttrain_shar")
    (root / "clips").mkdir()
    rng = np.random.default_rng(0)
    for name, seconds in SECONDS.items():  # PCM_16 wavs: the flac round trip of the Shar stage is exact
        sf.write(root / "clips" / f"{name}.wav", (0.2 * rng.standard_normal(int(16000 * seconds))).astype(np.float32),
                 16000)
    sf.write(root / "clips" / "tone22k.wav", (0.2 * rng.standard_normal(9000)).astype(np.float32), 22050)
    np.save(root / "clips" / "sampled.npy", rng.integers(0, 1024, size=(6, 8)))
    conv = [json.dumps(_conversation(k)) for k in range(N_CONV)]
    conv.insert(3, json.dumps({"id": "bad", "turns": [{"role": "user", "content": "no answer"}]}))
    (root / "sft.jsonl").write_text("\n".join(conv) + "\n")
    (root / "dpo.jsonl").write_text("\n".join(json.dumps(_pair(k)) for k in range(N_PAIRS)) + "\n")
    # one clip per forward pass: a padded batch changes a clip's codes (the codec sees the padding), so only
    # unbatched codes are the same whichever clips a shard or a dataset encodes together
    codec = CodecTokenizer(build_tiny_xcodec(seed=0), max_batch_size=1)
    out = {"root": root, "codec": codec}
    for name, task, manifest in (("sft", "conversation", root / "sft.jsonl"),
                                 ("dpo", "preference", root / "dpo.jsonl")):
        out[f"{name}_prep"] = prepare_source(task, manifest, root / "prepared" / name)
        tokenize_source(root / "prepared" / name / "cuts.jsonl.gz", root / "shar" / name, codec, shard_size=3,
                        progress=False)
        out[name] = str(root / "shar" / name)
    return out


def _cuts(source_dir: str) -> list:
    reader = ShardReader(source_dir)
    return [reader.get(s, o) for s, n in sorted(shard_counts(source_dir).items()) for o in range(n)]


def _same_sample(a, b) -> None:
    for key in ("tokens", "labels", "loss_weights"):
        assert torch.equal(a[key], b[key]), key
    assert a["task"] == b["task"]
    ca, cb = sample_clips(a), sample_clips(b)
    assert len(ca) == len(cb) and all(torch.equal(x, y) for x, y in zip(ca, cb))


def test_prepare_writes_one_cut_per_record_with_spans(data):
    report = data["sft_prep"]
    assert (report.num_records, report.num_rejects) == (N_CONV, 1)
    assert (data["dpo_prep"].num_records, data["dpo_prep"].num_rejects) == (N_PAIRS, 0)
    assert source_task(data["sft"]) == "conversation" and source_task(data["dpo"]) == "preference"
    records = {r.id: r for r in read_conversation_manifest(data["root"] / "sft.jsonl").records}
    cuts = _cuts(data["sft"])
    assert len(cuts) == N_CONV and not read_rejects(data["sft"])
    for cut in cuts:
        record = cut_record(cut)
        assert record == records[record.id] and record.source == records[record.id].source
        clips, codes = cut.custom["clips"], cut.custom["codes"]
        total = clips[-1]["samples"][1] if clips else 0
        assert [c["samples"][0] for c in clips] == [0, *[c["samples"][1] for c in clips]][:len(clips)]  # contiguous
        if clips:
            assert cut.has_recording and cut.num_samples == total and cut.sampling_rate == 16000
        else:
            assert not cut.has_recording and cut.duration == 0
        spans = sorted([c["frames"] for c in clips if c["frames"]] + [c["frames"] for c in codes])
        if spans:
            tokens = cut.load_custom("codec_tokens")
            assert tokens.dtype == np.int16 and tokens.shape == (spans[-1][1], 8)
            assert [s[0] for s in spans] == [0, *[s[1] for s in spans]][:len(spans)]
        for c in clips:  # written clips: encoded on their own, with the frame count of their own length
            if c["frames"]:
                assert c["frames"][1] - c["frames"][0] == num_codec_frames(c["samples"][1] - c["samples"][0])
    kinds = {r: cut.custom for cut in cuts for r in [cut.custom["origin"]]}
    hall = kinds["conv-0"]["clips"]
    assert [c["frames"] is not None for c in hall] == [False, True, False, True]  # heard, written, heard, written
    assert kinds["conv-0"]["turns"][3]["parts"][0] == {"clip": 2}
    sampled = np.load(data["root"] / "clips" / "sampled.npy")
    codes_cut = next(c for c in cuts if c.custom["origin"] == "conv-1")
    assert np.array_equal(codes_cut.load_custom("codec_tokens"), sampled)  # verbatim, no re-encoding


@pytest.mark.parametrize("cfg_dropout", [0.0, 0.5])
def test_conversations_from_shar_equal_the_in_memory_dataset(data, cfg_dropout):
    fmt = _fmt(cfg_dropout)
    result = read_conversation_manifest(data["root"] / "sft.jsonl")
    ds = ConversationDataset.from_records(result.records, fmt, data["codec"])
    index = {r.id: i for i, r in enumerate(ds.records)}
    loader = SharBatchLoader(SharLoaderConfig(sources=[{"name": "sft", "shar_dir": data["sft"]}]), fmt)
    for cut in _cuts(data["sft"]):
        i = index[cut.custom["origin"]]
        got = loader._plan._posttrain(cut, "sft/x", random.Random(i))
        expected = ds[i] if cfg_dropout == 0 else format_conversation_record(
            fmt, ds.records[i], FileClips(ds.written), random.Random(i))  # the dataset's function, same draw
        _same_sample(got, expected)
        assert record_length(cut_record(cut), fmt, CutClips(cut, lengths_only=True)) == got["tokens"].shape[0]


def test_pairs_from_shar_equal_the_in_memory_dataset(data):
    fmt = _fmt(0.3)  # pairs never drop the condition, whatever the formatter says
    result = read_preference_manifest(data["root"] / "dpo.jsonl")
    ds = PreferenceDataset.from_records(result.records, fmt, data["codec"])
    index = {r.id: i for i, r in enumerate(ds.records)}
    loader = SharBatchLoader(SharLoaderConfig(sources=[{"name": "dpo", "shar_dir": data["dpo"]}]), fmt)
    assert loader.pairs
    for cut in _cuts(data["dpo"]):
        item = loader._plan._posttrain(cut, f"dpo/{cut.id}", random.Random(0))
        expected = ds[index[cut.custom["origin"]]]
        assert item["id"] == expected["id"] == cut.custom["origin"] and item["sample_id"] == f"dpo/{cut.id}"
        for side in ("chosen", "rejected"):
            _same_sample(item[side], expected[side])


def _take(loader, n):
    return list(itertools.islice(iter(loader), n))


@pytest.mark.parametrize("pack", [False, True])
def test_conversation_loader_blends_packs_and_resumes_exactly(data, shar_sources, pack):
    cfg = SharLoaderConfig(sources=[{"name": "sft", "shar_dir": data["sft"], "weight": 3.0},
                                    {"name": "tta", "shar_dir": shar_sources["tta"]}],
                           window_size=6, max_tokens=1536, seq_len=768, seed=3, pack=pack)
    full = _take(SharBatchLoader(cfg, _fmt(0.3)), 8)
    tasks = {t for b in full for t in b.tasks}
    assert tasks == {"conversation", "tta"}
    assert any(b.audio_features is not None and b.audio_features.shape[0] >= 2 for b in full)
    if pack:
        assert all(b.tokens.shape[1] == 768 and b.segment_ids is not None for b in full)
        assert max(int(b.segment_ids.max()) for b in full) >= 1
    for k in (2, 5):
        first = SharBatchLoader(cfg, _fmt(0.3))
        head = _take(first, k)
        resumed = SharBatchLoader(cfg, _fmt(0.3))
        resumed.load_state_dict(head[-1].loader_state)
        assert all(same_batch(x, y) for x, y in zip(head + _take(resumed, 8 - k), full, strict=True)), k


def test_preference_loader_keeps_pairs_together_and_resumes_exactly(data):
    cfg = SharLoaderConfig(sources=[{"name": "dpo", "shar_dir": data["dpo"]}], window_size=5, max_tokens=800,
                           seq_len=400, seed=1)
    loader = SharBatchLoader(cfg, _fmt(0.3))
    full = _take(loader, 6)
    reader = ShardReader(data["dpo"])
    by_cut = {cut.id: cut for s, n in shard_counts(data["dpo"]).items() for cut in [reader.get(s, o)
                                                                                     for o in range(n)]}
    pair_fmt = loader._plan.pair_fmt
    seen = set()
    for b in full:
        rows = b.tokens.shape[0]
        assert rows == 2 * len(b.pair_ids) == 2 * len(b.ids) and rows * b.tokens.shape[1] <= 800
        assert b.tasks is None
        for k, (sample_id, pair_id) in enumerate(zip(b.ids, b.pair_ids)):
            cut = by_cut[sample_id.split("/", 1)[1]]
            assert cut.custom["origin"] == pair_id
            item = loader._plan._posttrain(cut, sample_id, random.Random(0))
            for row, side in ((2 * k, "chosen"), (2 * k + 1, "rejected")):  # rows interleaved as collate_pairs
                n = item[side]["tokens"].shape[0]
                assert torch.equal(b.tokens[row, :n], item[side]["tokens"]), (pair_id, side)
                assert torch.equal(b.loss_weights[row, :n], item[side]["loss_weights"])
            seen.add(pair_id)
    assert pair_fmt.cfg_dropout == 0.0 and len(seen) >= N_PAIRS // 2
    for k in (1, 4):
        head = _take(SharBatchLoader(cfg, _fmt(0.3)), k)
        resumed = SharBatchLoader(cfg, _fmt(0.3))
        resumed.load_state_dict(head[-1].loader_state)
        assert all(same_batch(x, y) for x, y in zip(head + _take(resumed, 6 - k), full, strict=True)), k


def test_long_samples_are_skipped_without_loading_audio(data, monkeypatch):
    import ualm_nemo.data.cuts as cuts_module

    cfg = SharLoaderConfig(sources=[{"name": "sft", "shar_dir": data["sft"]}], window_size=N_CONV,
                           max_tokens=4096, seq_len=60, seed=0)
    loads = []
    real = cuts_module.cut_waveform
    monkeypatch.setattr(cuts_module, "cut_waveform", lambda cut: loads.append(cut.id) or real(cut))
    batches = _take(SharBatchLoader(cfg, _fmt()), 1)
    assert batches and all(b.tokens.shape[1] <= 64 for b in batches)
    assert loads == []  # every sample with a heard clip is longer than 60 positions: none was loaded


def test_dpo_sources_are_loaded_alone_and_never_packed(data, shar_sources):
    mixed = SharLoaderConfig(sources=[{"name": "dpo", "shar_dir": data["dpo"]},
                                      {"name": "sft", "shar_dir": data["sft"]}])
    with pytest.raises(ValueError, match="mixes DPO preference sources"):
        SharBatchLoader(mixed, _fmt())
    packed = SharLoaderConfig(sources=[{"name": "dpo", "shar_dir": data["dpo"]}], pack=True)
    with pytest.raises(ValueError, match="never packed; set data.shar.pack: false"):
        SharBatchLoader(packed, _fmt())
    with pytest.raises(ValueError, match="at least 2 rows"):
        SharBatchLoader(SharLoaderConfig(sources=[{"name": "dpo", "shar_dir": data["dpo"]}], max_rows=1), _fmt())


def test_codec_stage_rejects_a_record_whose_clips_broke(data, tmp_path):
    root = data["root"]
    clips = tmp_path / "clips"
    clips.mkdir()
    for name in ("dog", "cat", "bird", "hall"):
        (clips / f"{name}.wav").write_bytes((root / "clips" / f"{name}.wav").read_bytes())
    (clips / "tone22k.wav").write_bytes((root / "clips" / "tone22k.wav").read_bytes())
    np.save(clips / "sampled.npy", np.load(root / "clips" / "sampled.npy"))
    (tmp_path / "sft.jsonl").write_text("\n".join(json.dumps(_conversation(k)) for k in range(5)) + "\n")
    prepare_source("conversation", tmp_path / "sft.jsonl", tmp_path / "prep")
    sf.write(clips / "bird.wav", np.zeros(1000, np.float32), 16000)  # changed length since preparation
    np.save(clips / "sampled.npy", np.zeros((6, 4)))  # no longer [F, 8]
    from ualm_nemo.data.tokenize_stage import iter_shard_cuts

    (_, prepared), = list(iter_shard_cuts(tmp_path / "prep" / "cuts.jsonl.gz", 10, [0]))
    with pytest.raises(ValueError, match="need a codec"):
        tokenize_shard(prepared, None, ("tta",))
    ready, rejects, fields, _ = tokenize_shard(prepared, data["codec"], ("tta",))
    assert fields == {"recording": "flac", "codec_tokens": "numpy"}
    reasons = {r["origin"]: r["reason"] for r in rejects}
    assert sorted(c.custom["origin"] for c in ready) == ["conv-2", "conv-3"]
    assert "at preparation (the file changed" in reasons["conv-0"] and "shape" in reasons["conv-1"]
    assert set(reasons) == {"conv-0", "conv-1", "conv-4"}


def test_preference_batches_do_not_depend_on_worker_count(data):
    base = dict(sources=[{"name": "dpo", "shar_dir": data["dpo"]}], window_size=4, max_tokens=800, seq_len=400,
                seed=2)
    alone = _take(SharBatchLoader(SharLoaderConfig(**base), _fmt()), 5)
    pooled = _take(SharBatchLoader(SharLoaderConfig(**base, num_workers=2), _fmt()), 5)
    assert all(same_batch(x, y) for x, y in zip(alone, pooled, strict=True))


def test_cli_prepares_and_tokenizes_post_training_sources(data, tmp_path, monkeypatch, capsys):
    from ualm_nemo.testing.examples import load_example

    root = data["root"]
    monkeypatch.setattr("sys.argv", ["prepare_data.py", "--out", str(tmp_path / "prep"),
                                     "--source", f"sft=conversation:{root / 'sft.jsonl'}",
                                     "--source", f"dpo=preference:{root / 'dpo.jsonl'}", "--max-duration", "1.39"])
    with pytest.raises(SystemExit) as done:
        load_example("prepare_data").main()
    assert done.value.code == 0
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # all distinct clips together: conv-0 1.4 s (dog, hall, hall[0.1:0.4], bird[0.05:0.35]), conv-5 1.7 s (bird
    # instead of dog), conv-8 1.66 s (bird, cat, dog[0.1:], 22 kHz tone); conv-3 1.36 s (dog, not bird) is kept
    long = 3
    assert counts == {"cuts": N_CONV - long + N_PAIRS, "rejects": 1 + long}
    assert "--max-duration" in (tmp_path / "prep" / "sft" / "rejects.jsonl").read_text()
    monkeypatch.setattr("sys.argv", ["tokenize_audio.py", "--cuts", str(tmp_path / "prep" / "dpo" / "cuts.jsonl.gz"),
                                     "--out", str(tmp_path / "shar"), "--codec", "tiny", "--shard-size", "4",
                                     "--no-progress"])
    load_example("tokenize_audio").main()
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["cuts"], summary["rejects"], summary["written"]) == (N_PAIRS, 0, 2)
    assert source_task(tmp_path / "shar") == "preference"


def test_length_limit_hands_post_training_records_to_their_length(data):
    from ualm_nemo.data.length_limit import record_length as any_length

    fmt = _fmt()
    for record in read_preference_manifest(data["root"] / "dpo.jsonl").records[:3]:
        assert any_length(record, fmt) == record_length(record, fmt) > 0
