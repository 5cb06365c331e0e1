"""MicroBatch, the one batch type: a split keeps every clip, task and pair with its samples, and every field a collate
function fills is read by the model or a training consumer (objectives, validation, the step grouping, the DPO
reference), so no collate function produces a field for nobody."""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import random

import pytest
import torch

from ualm_nemo.data.batching import collate_packed
from ualm_nemo.data.dataset import collate
from ualm_nemo.data.formatting import AudioIn, AudioOut, SampleFormatter, sample_clips
from ualm_nemo.data.microbatch import MicroBatch
from ualm_nemo.data.posttrain_dataset import collate_pairs
from ualm_nemo.data.shar_dataset import SharBatchLoader, SharLoaderConfig
from ualm_nemo.data.tokenizer import ByteChatTokenizer
from ualm_nemo.model.vocab import UnifiedVocab

V = UnifiedVocab(text_vocab_size=384)
FIELDS = tuple(f.name for f in dataclasses.fields(MicroBatch))
# filled for reports only, read by no training code: benchmarks/data_loader.py's tokens/s
REPORT_ONLY = {"lengths"}


def _wav(n: int, freq: float) -> torch.Tensor:
    return torch.sin(torch.arange(n) * freq) * 0.3


def _samples(fmt: SampleFormatter) -> list[dict]:
    """Real formatted samples: heard clips 0, 1, 2 (one conversation hears two), text and TTA rows between."""
    rng = random.Random(0)
    codes = torch.randint(0, 1024, (3, 8), generator=torch.Generator().manual_seed(0))
    return [fmt.format_understanding([("user", "<sound>\nwhat?"), ("assistant", "a dog")], _wav(4000, 0.05)),
            fmt.format_tta("rain", codes, rng),
            fmt.format_conversation([("user", [AudioIn(_wav(1280, 0.1)), "and", AudioIn(_wav(2560, 0.2)), "?"]),
                                     ("assistant", ["two"])], rng),
            fmt.format_text([("user", "hi"), ("assistant", "hello")]),
            fmt.format_text([("user", "2+2"), ("assistant", "4")]),
            fmt.format_conversation([("user", ["make it"]), ("assistant", [AudioOut(codes)])], rng),
            fmt.format_understanding([("user", "<sound>\nloud?"), ("assistant", "no")], _wav(6000, 0.3)),
            fmt.format_text([("user", "bye"), ("assistant", "bye")])]


def _clips(batch: MicroBatch) -> list[torch.Tensor]:
    """The batch's clips unpadded, in order."""
    if batch.audio_features is None:
        return []
    return [batch.audio_features[k, :, :int(n)] for k, n in enumerate(batch.audio_feature_lens)]


def _placeholder_frames_agree(batch: MicroBatch) -> bool:
    from ualm_nemo.model.audio_frames import num_encoder_frames_from_mel

    frames = sum(num_encoder_frames_from_mel(int(n)) for n in batch.audio_feature_lens) \
        if batch.audio_feature_lens is not None else 0
    return int((batch.tokens[..., 0] == V.audio_in_id).sum()) == frames


@pytest.mark.parametrize("parts", [2, 4, 8])
def test_split_keeps_each_clip_with_its_sample(parts):
    samples = _samples(SampleFormatter(ByteChatTokenizer(), V, cfg_dropout=0.0))
    whole = collate(samples, V)
    micro = whole.split(parts, V.audio_in_id)
    step = len(samples) // parts
    assert len(micro) == parts
    for k, mb in enumerate(micro):  # each part holds exactly its own samples' clips, in placeholder order
        own = [clip for s in samples[k * step:(k + 1) * step] for clip in sample_clips(s)]
        got = _clips(mb)
        assert len(got) == len(own) and all(torch.equal(a, b) for a, b in zip(got, own)), k
        assert _placeholder_frames_agree(mb)
        assert torch.equal(mb.tokens, whole.tokens[k * step:(k + 1) * step])
    flat = [c for mb in micro for c in _clips(mb)]
    assert len(flat) == len(_clips(whole)) == 4 and all(torch.equal(a, b) for a, b in zip(flat, _clips(whole)))
    assert [t for mb in micro for t in mb.tasks] == whole.tasks
    assert torch.equal(torch.cat([mb.lengths for mb in micro]), whole.lengths)


def test_split_of_packed_rows_and_of_pairs():
    fmt = SampleFormatter(ByteChatTokenizer(), V, cfg_dropout=0.0)
    samples = _samples(fmt)
    rows = [samples[0:2], samples[2:4], samples[4:5], samples[5:8]]
    packed = collate_packed(rows, V, 256)
    halves = packed.split(2, V.audio_in_id)
    assert halves[0].tasks == [s["task"] for s in samples[:4]] and halves[1].tasks == [s["task"] for s in samples[4:]]
    assert torch.equal(torch.cat([h.segment_ids for h in halves]), packed.segment_ids)
    assert torch.equal(torch.cat([h.position_ids for h in halves]), packed.position_ids)
    assert all(_placeholder_frames_agree(h) for h in halves) and len(_clips(halves[0])) == 3

    items = [{"id": f"p{k}", "chosen": samples[2 * k], "rejected": samples[2 * k + 1]} for k in range(4)]
    pairs = collate_pairs(items, V)
    pairs.ref_logps = torch.arange(8 * 8, dtype=torch.float64).view(8, 8)
    quarters = pairs.split(4, V.audio_in_id)
    assert [q.pair_ids for q in quarters] == [["p0"], ["p1"], ["p2"], ["p3"]]
    assert all(torch.equal(q.ref_logps, pairs.ref_logps[2 * k:2 * k + 2]) for k, q in enumerate(quarters))
    with pytest.raises(ValueError, match="chosen/rejected pair"):
        pairs.split(8, V.audio_in_id)
    with pytest.raises(ValueError, match="does not split"):
        collate(samples[:3], V).split(2, V.audio_in_id)


class _Traced(MicroBatch):
    """A MicroBatch that records which of its fields are read (a consumer's attribute access)."""

    def __getattribute__(self, name: str):
        if name in FIELDS:
            object.__getattribute__(self, "__dict__").setdefault("_read", set()).add(name)
        return object.__getattribute__(self, name)

    @classmethod
    def of(cls, batch: MicroBatch) -> "_Traced":
        return cls(**{name: getattr(batch, name) for name in FIELDS})

    def read(self) -> set[str]:
        return self.__dict__.get("_read", set())


def _filled(batch: MicroBatch) -> set[str]:
    return {name for name in FIELDS if getattr(batch, name) is not None}


def _consume(batch: _Traced, dpo: bool = False) -> set[str]:
    """What the training path reads: the model's keyword inputs, the step's objective, validation's per-task loss,
    the Shar step grouping, and for DPO the offline reference's attach."""
    from ualm_nemo.model.ualm import UALMLanguageModel
    from ualm_nemo.training.dpo import DPOConfig
    from ualm_nemo.training.dpo_reference import attach
    from ualm_nemo.training.nemo_model import StepGroups
    from ualm_nemo.training.objectives import DPOObjective, LMObjective
    from ualm_nemo.training.validation import ValidationLoss

    inputs = batch.model_inputs()  # what engine._forward_step hands the model: each a forward keyword
    assert set(inputs) <= set(inspect.signature(UALMLanguageModel.forward).parameters)
    b, s, n = batch.tokens.shape
    nll = torch.rand(b, s, n) * (batch.labels != -100)
    if dpo:
        attach(batch, {p: torch.zeros(2, n, dtype=torch.float64) for p in batch.pair_ids})
        DPOObjective(DPOConfig(), V).loss(batch, nll)
    else:
        LMObjective().loss(batch, nll.sum(-1))
        ValidationLoss(n).loss(batch, nll)
    if batch.loader_state is not None:
        list(StepGroups([batch], 1))
    return batch.read()


def _loader_batches(shar_sources, pack: bool) -> list[MicroBatch]:
    cfg = SharLoaderConfig(sources=[{"name": t, "shar_dir": d} for t, d in shar_sources.items()], window_size=8,
                           max_tokens=2048, seq_len=1024, seed=5, pack=pack)
    return list(itertools.islice(SharBatchLoader(cfg, SampleFormatter(ByteChatTokenizer(), V)), 4))


def test_every_filled_field_is_read(shar_sources):
    samples = _samples(SampleFormatter(ByteChatTokenizer(), V, cfg_dropout=0.0))
    items = [{"id": f"p{k}", "chosen": samples[2 * k], "rejected": samples[2 * k + 1]} for k in range(4)]
    cases = {"collate": (collate(samples, V), False),
             "collate_packed": (collate_packed([samples[:3], samples[3:]], V, 512), False),
             "collate_pairs": (collate_pairs(items, V), True)}
    for pack in (False, True):
        for k, batch in enumerate(_loader_batches(shar_sources, pack)):
            cases[f"shar pack={pack} #{k}"] = (batch, False)
    assert any(c.audio_features is not None for c, _ in cases.values())
    for name, (batch, dpo) in cases.items():
        unread = _filled(batch) - _consume(_Traced.of(batch), dpo) - REPORT_ONLY
        assert not unread, f"{name} fills {sorted(unread)}, which nothing in training reads"
    assert {"ids", "loader_state", "segment_ids", "position_ids"} <= set().union(*(_filled(b) for b, _ in cases.values()))


def test_the_trace_sees_an_unread_field():
    """The check above can fail: a field filled for nobody (here: Shar ids on a batch that no step grouping takes,
    as it has no loader state) is reported, not counted as read."""
    samples = _samples(SampleFormatter(ByteChatTokenizer(), V, cfg_dropout=0.0))
    batch = collate(samples, V)
    batch.ids = [str(k) for k in range(len(samples))]  # the Shar loader's ids without its loader state
    assert "ids" in _filled(batch) - _consume(_Traced.of(batch)) - REPORT_ONLY
