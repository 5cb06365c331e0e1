"""Demo dataset over synthetic data (codec tokens precomputed and cached), and collate's padding and audio order."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch.utils.data import DataLoader

from ualm_nemo.codec.xcodec import CodecTokenizer, build_tiny_xcodec, num_codec_frames
from ualm_nemo.data.dataset import Collator, UALMDataset, build_demo_dataset, collate
from ualm_nemo.data.formatting import SampleFormatter
from ualm_nemo.data.raw import TTARecord
from ualm_nemo.data.synthetic import synthesize_demo_data
from ualm_nemo.data.tokenizer import ByteChatTokenizer
from ualm_nemo.model.audio_frames import num_encoder_frames_from_mel
from ualm_nemo.model.vocab import IGNORE_INDEX, UnifiedVocab

V = UnifiedVocab(text_vocab_size=384)
NUM = {"tta": 5, "understanding": 4, "text": 3}


@pytest.fixture(scope="module")
def codec() -> CodecTokenizer:
    return CodecTokenizer(build_tiny_xcodec(seed=0))


@pytest.fixture(scope="module")
def manifests(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return synthesize_demo_data(out, num_tta=NUM["tta"], num_understanding=NUM["understanding"],
                                num_text=NUM["text"], seed=0)


@pytest.fixture(scope="module")
def dataset(manifests, codec, tmp_path_factory) -> UALMDataset:
    cache = tmp_path_factory.mktemp("cache") / "codes.pt"
    ds, rejects = build_demo_dataset(manifests, ByteChatTokenizer(), codec, V, seed=0, cache_path=cache,
                                     cfg_dropout=0.5)
    assert rejects == []
    return ds


def test_dataset_items(dataset: UALMDataset):
    assert len(dataset) == sum(NUM.values())
    tasks = [dataset[i]["task"] for i in range(len(dataset))]
    assert tasks == ["tta"] * 5 + ["understanding"] * 4 + ["text"] * 3
    for i, record in enumerate(dataset.records):
        if isinstance(record, TTARecord):
            frames = num_codec_frames(round((record.end - record.start) * 16000))
            assert dataset.codes[i].shape == (frames, 8)
            s = dataset[i]
            assert int((s["loss_weights"] == 0.125).all(dim=1).sum()) == frames + 7  # one learned row per grid row
        else:
            assert dataset.codes[i] is None


def test_dataset_is_deterministic_and_epoch_dependent(manifests, codec, dataset):
    again, _ = build_demo_dataset(manifests, ByteChatTokenizer(), codec, V, seed=0, cfg_dropout=0.5)
    for i in range(len(dataset)):
        a, b = dataset[i], again[i]
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["labels"], b["labels"])

    def dropped(ds: UALMDataset) -> list[bool]:
        return [bool(ds[i]["tokens"][0, 0] == V.pad_id) for i in range(NUM["tta"])]

    per_epoch = []
    for epoch in range(6):
        dataset.set_epoch(epoch)
        per_epoch.append(dropped(dataset))
    dataset.set_epoch(0)
    assert per_epoch[0] == dropped(dataset)
    assert len({tuple(p) for p in per_epoch}) > 1  # draws change with the epoch


def test_codes_cache_is_reused(manifests, codec, dataset, tmp_path, monkeypatch):
    cache = tmp_path / "codes.pt"
    first, _ = build_demo_dataset({"tta": manifests["tta"]}, ByteChatTokenizer(), codec, V, cache_path=cache)
    monkeypatch.setattr(codec, "encode", lambda wavs: pytest.fail("cache not used"))
    second, _ = build_demo_dataset({"tta": manifests["tta"]}, ByteChatTokenizer(), codec, V, cache_path=cache)
    for a, b, c in zip(first.codes, second.codes, dataset.codes):
        assert torch.equal(a, b) and torch.equal(a, c) and b.dtype == torch.long
    monkeypatch.undo()
    other = CodecTokenizer(build_tiny_xcodec(seed=7))  # another codec: its codes, not the cached ones
    third, _ = build_demo_dataset({"tta": manifests["tta"]}, ByteChatTokenizer(), other, V, cache_path=cache)
    assert not all(torch.equal(a, b) for a, b in zip(first.codes, third.codes))
    assert torch.load(cache, weights_only=True)["codec"] == other.fingerprint() != codec.fingerprint()


def test_collate_shapes_and_padding(dataset: UALMDataset):
    samples = [dataset[i] for i in (0, 5, 9, 6)]  # tta, understanding, text, understanding
    batch = collate(samples, V, pad_to_multiple=8)
    lengths = [s["tokens"].shape[0] for s in samples]
    seq = -(-max(lengths) // 8) * 8
    assert batch.tokens.shape == batch.labels.shape == batch.loss_weights.shape == (4, seq, 8)
    assert batch.position_ids is None and batch.segment_ids is None  # one sample per row: positions 0..seq-1
    assert batch.lengths.tolist() == lengths and batch.tasks == ["tta", "understanding", "text", "understanding"]
    pad_row = V.text_position_streams(V.pad_id)
    for i, (s, n) in enumerate(zip(samples, lengths)):
        assert torch.equal(batch.tokens[i, :n], s["tokens"])
        assert torch.equal(batch.labels[i, :n], s["labels"])
        assert torch.equal(batch.loss_weights[i, :n], s["loss_weights"])
        assert all(row == pad_row for row in batch.tokens[i, n:].tolist())
        assert bool((batch.labels[i, n:] == IGNORE_INDEX).all())
        assert float(batch.loss_weights[i, n:].abs().sum()) == 0.0

    feats, lens = batch.audio_features, batch.audio_feature_lens
    expected = [samples[1]["audio_features"], samples[3]["audio_features"]]  # batch-major order of appearance
    assert lens.dtype == torch.long and lens.tolist() == [f.shape[1] for f in expected]
    assert feats.shape == (2, 128, max(lens.tolist()))
    for k, f in enumerate(expected):
        assert torch.equal(feats[k, :, : f.shape[1]], f)
        assert float(feats[k, :, f.shape[1]:].abs().sum()) == 0.0
    placeholders = int((batch.tokens[..., 0] == V.audio_in_id).sum())
    assert placeholders == sum(num_encoder_frames_from_mel(int(n)) for n in lens)


def test_collate_without_audio_input(dataset: UALMDataset):
    batch = collate([dataset[0], dataset[10]], V, pad_to_multiple=1)
    assert batch.audio_features is None and batch.audio_feature_lens is None
    assert batch.tokens.shape[1] == max(dataset[0]["tokens"].shape[0], dataset[10]["tokens"].shape[0])


def test_collate_refuses_placeholder_feature_mismatch(dataset: UALMDataset):
    s = dict(dataset[5])
    s["audio_features"] = s["audio_features"][:, :-40]
    with pytest.raises(ValueError, match="audio_in"):
        collate([s], V)


def test_dataloader_with_collator(dataset: UALMDataset):
    loader = DataLoader(dataset, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0),
                        collate_fn=Collator(V))
    seen = 0
    for batch in loader:
        assert batch.tokens.shape[1] % 8 == 0
        seen += batch.tokens.shape[0]
    assert seen == len(dataset)


def test_dataset_needs_codes_for_tta(dataset: UALMDataset):
    fmt = SampleFormatter(ByteChatTokenizer(), V)
    with pytest.raises(ValueError, match="codec tokens"):
        UALMDataset(dataset.records[:1], fmt)
    with pytest.raises(ValueError, match="CodecTokenizer"):
        UALMDataset.from_records(dataset.records[:1], fmt, codec=None)
