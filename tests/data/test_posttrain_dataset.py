"""SFT / DPO datasets over real files and a real tiny codec: written clips encoded once, codes files verbatim,
over-long records skipped, pairs collated chosen / rejected interleaved with every clip in placeholder order."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

torch.set_num_threads(1)

from ualm_nemo.codec.xcodec import CodecTokenizer, build_tiny_xcodec, num_codec_frames
from ualm_nemo.data.conversation import read_conversation_manifest
from ualm_nemo.data.formatting import AudioIn, AudioOut, LogMel, SampleFormatter, sample_clips
from ualm_nemo.data.posttrain_dataset import (ConversationDataset, PairCollator,
                                              collate_conversations, collate_pairs, load_conversation_dataset,
                                              load_preference_dataset)
from ualm_nemo.data.raw import load_audio
from ualm_nemo.data.tokenizer import build_tokenizer
from ualm_nemo.model.audio_frames import num_encoder_frames
from ualm_nemo.model.delay_pattern import apply_delay
from ualm_nemo.model.vocab import IGNORE_INDEX, UnifiedVocab

V = UnifiedVocab(text_vocab_size=384)
SECONDS = {"dog": 0.2, "cat": 0.3, "bird": 0.5}


class CountingCodec(CodecTokenizer):
    """The tiny X-Codec, counting the clips it encodes."""

    def __init__(self) -> None:
        super().__init__(build_tiny_xcodec(seed=0))
        self.encoded: list[int] = []

    def encode(self, wavs):
        self.encoded += [int(w.shape[0]) for w in wavs]
        return super().encode(wavs)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("posttrain")
    (root / "clips").mkdir()
    rng = np.random.default_rng(0)
    for name, seconds in SECONDS.items():
        sf.write(root / "clips" / f"{name}.wav", (0.2 * rng.standard_normal(int(16000 * seconds))).astype(np.float32),
                 16000)
    np.save(root / "clips" / "sampled.npy", rng.integers(0, 1024, size=(4, 8)))
    return root


def _formatter(**kw) -> SampleFormatter:
    return SampleFormatter(build_tokenizer("byte"), V, **kw)


def _manifest(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _user(*parts) -> dict:
    return {"role": "user", "content": list(parts)}


def _assistant(*parts, **kw) -> dict:
    return {"role": "assistant", "content": list(parts), **kw}


CONVERSATIONS = [
    {"id": "dog", "turns": [_user({"text": "a dog"}), _assistant({"audio": "clips/dog.wav"}),
                            _user({"audio": "clips/dog.wav"}, {"text": "what is it?"}), _assistant({"text": "a dog"})]},
    {"id": "dog-again", "turns": [_user({"text": "the dog, again"}), _assistant({"audio": "clips/dog.wav"})]},
    {"id": "sampled", "turns": [_user({"text": "anything"}),
                                _assistant({"text": "here"}, {"codes": "clips/sampled.npy"})]},
    {"id": "long", "turns": [_user({"audio": "clips/bird.wav"}, {"text": "describe " * 20}),
                             _assistant({"text": "a bird " * 20})]},
]


def test_conversation_items_and_encode_once(root, tmp_path):
    codec = CountingCodec()
    records = read_conversation_manifest(_manifest(root / "conv.jsonl", CONVERSATIONS)).records
    fmt = _formatter(cfg_dropout=0.0)
    cache = tmp_path / "codes.pt"
    ds = ConversationDataset.from_records(records, fmt, codec, cache_path=cache)
    dog_samples = round(16000 * SECONDS["dog"])
    assert codec.encoded == [dog_samples]  # written twice (two records), heard once: encoded once
    dog = ds.written[(str(root / "clips" / "dog.wav"), 0.0, None)]
    assert dog.shape == (num_codec_frames(dog_samples), 8)
    fresh = CodecTokenizer(build_tiny_xcodec(seed=0))
    assert torch.equal(dog, fresh.encode([load_audio(root / "clips" / "dog.wav")])[0])
    # the cache file serves a second build without the codec
    again = ConversationDataset.from_records(records, fmt, CountingCodec(), cache_path=cache)
    assert again.written.keys() == ds.written.keys() and all(torch.equal(again.written[k], ds.written[k])
                                                             for k in ds.written)

    # item 0: the written clip's grid, then the same clip heard back
    wav = load_audio(root / "clips" / "dog.wav")
    expected = fmt.format_conversation([("user", ["a dog"]), ("assistant", [AudioOut(dog)]),
                                        ("user", [AudioIn(wav), "what is it?"]), ("assistant", ["a dog"])],
                                       random.Random(0))
    s = ds[0]
    for key in ("tokens", "labels", "loss_weights"):
        assert torch.equal(s[key], expected[key]), key
    assert torch.equal(s["audio_features"], LogMel()(wav)) and s["task"] == "conversation"
    assert int((s["tokens"][:, 0] == V.audio_in_id).sum()) == num_encoder_frames(wav.shape[0])


def test_codes_file_used_verbatim(root):
    records = read_conversation_manifest(_manifest(root / "conv.jsonl", CONVERSATIONS)).records
    ds = ConversationDataset.from_records(records[2:3], _formatter(cfg_dropout=0.0), codec=None)  # no wav written
    assert ds.written == {}
    codes = torch.from_numpy(np.load(root / "clips" / "sampled.npy"))
    s = ds[0]
    start = int((s["tokens"][:, 0] == V.audio_start_id).nonzero()[0])
    grid = V.codes_to_ids(apply_delay(codes, pad=V.codebook_size))  # [F + 7, 8]
    assert torch.equal(s["tokens"][start + 1: start + 1 + grid.shape[0]], grid)
    assert s["tokens"][start + 1 + grid.shape[0], 0] == V.audio_end_id
    assert bool((s["loss_weights"][start: start + grid.shape[0]] == 0.125).all())  # the grid is learned


def test_overlong_records_are_skipped_counted_and_logged(root, caplog):
    path = _manifest(root / "conv.jsonl", CONVERSATIONS)
    fmt = _formatter(cfg_dropout=0.0)
    records = read_conversation_manifest(path).records
    full = ConversationDataset.from_records(records, fmt, CountingCodec())
    lengths = [full[i]["tokens"].shape[0] for i in range(len(full))]
    seq_len = sorted(lengths)[-2]  # every sample but the longest fits
    assert lengths[3] > seq_len
    codec = CountingCodec()
    with caplog.at_level(logging.WARNING):
        ds, rejects = load_conversation_dataset(path, fmt, codec, seq_len=seq_len)
    assert [r.id for r in ds.records] == ["dog", "dog-again", "sampled"]
    assert len(ds.skipped) == 1 and rejects == ds.skipped
    assert ds.skipped[0].source == "conv.jsonl:4" and "'long'" in ds.skipped[0].reason
    assert f"{lengths[3]} positions" in ds.skipped[0].reason
    assert "skipped 1 of 4" in caplog.text and "long" in caplog.text


def test_overlong_written_audio_counts_before_encoding(root):
    records = read_conversation_manifest(_manifest(root / "conv.jsonl", CONVERSATIONS)).records
    codec = CountingCodec()
    ds = ConversationDataset.from_records(records[1:2], _formatter(), codec, seq_len=10)
    assert len(ds) == 0 and len(ds.skipped) == 1 and codec.encoded == []  # skipped before the codec runs


PAIRS = [
    {"id": "p0", "prompt": [_user({"audio": "clips/cat.wav"}, {"text": "and"}, {"audio": "clips/bird.wav"},
                                  {"text": "make both"})],
     "chosen": [{"audio": "clips/dog.wav"}], "rejected": [{"codes": "clips/sampled.npy"}],
     "scores": {"chosen": {"clap": 0.5}}},
    {"id": "p1", "prompt": [{"role": "system", "content": "be brief"}, _user({"text": "bark"}),
                            _assistant({"audio": "clips/dog.wav"}), _user({"audio": "clips/bird.wav"},
                                                                        {"text": "like this?"})],
     "chosen": "yes", "rejected": [{"text": "no, "}, {"audio": "clips/dog.wav"}]},
]


def test_preference_items_and_collate_pairs(root):
    codec = CountingCodec()
    fmt = _formatter(cfg_dropout=1.0)  # DPO never drops the condition, whatever the formatter says
    ds, rejects = load_preference_dataset(_manifest(root / "pairs.jsonl", PAIRS), fmt, codec)
    assert rejects == [] and len(ds) == 2 and fmt.cfg_dropout == 1.0 and ds.formatter.cfg_dropout == 0.0
    assert codec.encoded == [round(16000 * SECONDS["dog"])]  # dog.wav in 3 places, encoded once
    items = [ds[0], ds[1]]
    assert [it["id"] for it in items] == ["p0", "p1"]
    for it in items:
        for side in ("chosen", "rejected"):
            s = it[side]
            assert s["tokens"][0, 0] != V.pad_id  # never dropped
            learned = (s["loss_weights"] > 0).any(dim=1).nonzero().flatten()
            last_turn = int((s["tokens"][:, 0] == 257).nonzero()[-1])  # the answer's <|im_start|>
            assert int(learned.min()) > last_turn  # only the answer is learned
    # pair 0, chosen: the prompt's two heard clips, in placeholder order (cat then bird)
    mel = LogMel()
    cat, bird = (mel(load_audio(root / "clips" / f"{n}.wav")) for n in ("cat", "bird"))
    assert [c.shape[1] for c in sample_clips(items[0]["chosen"])] == [cat.shape[1], bird.shape[1]]

    batch = collate_pairs(items, V)
    assert batch.pair_ids == ["p0", "p1"]
    rows = [items[0]["chosen"], items[0]["rejected"], items[1]["chosen"], items[1]["rejected"]]
    assert batch.tokens.shape[0] == 4 and batch.lengths.tolist() == [r["tokens"].shape[0] for r in rows]
    for b, r in enumerate(rows):
        n = r["tokens"].shape[0]
        assert torch.equal(batch.tokens[b, :n], r["tokens"]) and torch.equal(batch.labels[b, :n], r["labels"])
        assert bool((batch.labels[b, n:] == IGNORE_INDEX).all())
    # clips batch-major, each sample's in placeholder order: (cat, bird) x 2 for pair 0, bird x 2 for pair 1
    expected = [cat, bird, cat, bird, bird, bird]
    assert batch.audio_feature_lens.tolist() == [c.shape[1] for c in expected]
    for k, c in enumerate(expected):
        assert torch.allclose(batch.audio_features[k, :, : c.shape[1]], c)
    assert batch.tasks is None  # DPO reads pairs, not tasks
    assert PairCollator(V)(items).pair_ids == ["p0", "p1"]


def test_collate_conversations_checks_each_sample(root):
    records = read_conversation_manifest(_manifest(root / "conv.jsonl", CONVERSATIONS)).records
    ds = ConversationDataset.from_records(records, _formatter(cfg_dropout=0.0), CountingCodec())
    samples = [ds[i] for i in range(len(ds))]
    batch = collate_conversations(samples, V)
    assert batch.audio_features.shape[0] == 2  # dog (item 0) then bird (item 3)
    assert batch.tokens.shape[1] % 8 == 0
    broken = dict(samples[0], audio_features=None)
    with pytest.raises(ValueError, match="sample 1 has"):
        collate_conversations([samples[1], broken], V)
    with pytest.raises(ValueError, match="empty"):
        collate_pairs([], V)
