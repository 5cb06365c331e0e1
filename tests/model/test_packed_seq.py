"""Packed rows as THD sequences (model/packed_seq.py): the cu_seqlens built from segment ids describe exactly the
attention of the mask path (model/attention_mask.packed_attention_mask), and the model's THD forward computes what the
samples compute alone (on CPU, with a torch stand-in for Transformer Engine's THD attention)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ualm_nemo.model.attention_mask import packed_attention_mask
from ualm_nemo.model.packed_seq import check_segments, flatten_rows, packed_seq_params, unflatten_rows
from ualm_nemo.testing.dist import run_distributed


def _thd_allowed(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """cu_seqlens [n + 1] -> BoolTensor [t, t], True where query q may see key k (causal inside a sequence)."""
    bounds = cu_seqlens.tolist()
    t = bounds[-1]
    allowed = torch.zeros(t, t, dtype=torch.bool)
    for a, b in zip(bounds[:-1], bounds[1:]):
        allowed[a:b, a:b] = torch.ones(b - a, b - a, dtype=torch.bool).tril()
    return allowed


def _mask_path_allowed(segment_ids: torch.Tensor) -> torch.Tensor:
    """The mask path for the rows laid end to end: [t, t], rows never see each other."""
    b, s = segment_ids.shape
    allowed = torch.zeros(b * s, b * s, dtype=torch.bool)
    for r, row in enumerate(~packed_attention_mask(segment_ids)[:, 0]):
        allowed[r * s:(r + 1) * s, r * s:(r + 1) * s] = row
    return allowed


def _padding_run_allowed(segment_ids: torch.Tensor) -> torch.Tensor:
    """The THD padding convention, written out: a padding query sees the padding before it in its own run."""
    b, s = segment_ids.shape
    allowed = torch.zeros(b * s, b * s, dtype=torch.bool)
    for r in range(b):
        for q in range(s):
            k = q
            while k >= 0 and segment_ids[r, k] == -1:
                allowed[r * s + q, r * s + k] = segment_ids[r, q] == -1
                k -= 1
    return allowed


def _random_rows(gen: torch.Generator, s: int = 24) -> torch.Tensor:
    """Rows of varying segment counts and padding, plus a row that is one sample and a row without padding."""
    rows = [torch.zeros(s, dtype=torch.long)]  # one sample fills the row
    for n_seg in (1, 2, 3, 5):
        lengths = torch.randint(1, 6, (n_seg,), generator=gen).tolist()
        row = torch.cat([torch.full((n,), k) for k, n in enumerate(lengths)])[:s]
        rows.append(torch.cat([row, torch.full((s - row.numel(),), -1)]))
    cut = int(torch.randint(1, s, (1,), generator=gen))
    rows.append(torch.cat([torch.zeros(cut), torch.ones(s - cut)]).long())  # two samples, no padding
    rows.append(torch.full((s,), -1))  # an all-padding row (a loader never makes one; the rule still holds)
    order = torch.randperm(len(rows), generator=gen)
    return torch.stack([rows[i] for i in order])


@pytest.mark.parametrize("seed", range(4))
def test_cu_seqlens_describe_the_mask_path(seed):
    segment_ids = _random_rows(torch.Generator().manual_seed(seed))
    params = packed_seq_params(segment_ids)
    b, s = segment_ids.shape
    assert params.qkv_format == "thd" and params.cu_seqlens_q.dtype == torch.int32
    assert params.cu_seqlens_kv is params.cu_seqlens_q and params.cu_seqlens_q_padded is None
    assert int(params.cu_seqlens_q[0]) == 0 and int(params.cu_seqlens_q[-1]) == b * s
    lengths = params.cu_seqlens_q.diff()
    assert bool((lengths > 0).all()) and params.max_seqlen_q == params.max_seqlen_kv == int(lengths.max())
    assert isinstance(params.max_seqlen_q, int)
    thd, mask = _thd_allowed(params.cu_seqlens_q), _mask_path_allowed(segment_ids)
    real = segment_ids.reshape(-1) >= 0
    assert torch.equal(thd[real], mask[real])  # real queries: element for element
    # padding queries: the mask path sees only itself, THD the padding run up to itself; never a real key
    assert torch.equal(thd[~real], _padding_run_allowed(segment_ids)[~real])
    assert not thd[~real][:, real].any() and not thd[real][:, ~real].any()
    assert torch.equal(mask[~real], torch.eye(b * s, dtype=torch.bool)[~real])


def test_docstring_example():
    segment_ids = torch.tensor([[0, 0, 0, 1, 1, -1], [0, 0, 0, 0, 1, 1]])
    params = packed_seq_params(segment_ids)
    assert params.cu_seqlens_q.tolist() == [0, 3, 5, 6, 10, 12] and params.max_seqlen_q == 4


def test_rows_with_the_same_ids_stay_apart():
    params = packed_seq_params(torch.zeros(3, 5, dtype=torch.long))
    assert params.cu_seqlens_q.tolist() == [0, 5, 10, 15] and params.max_seqlen_q == 5


def test_flatten_round_trip():
    x = torch.randn(3, 7, 8)
    flat = flatten_rows(x)
    assert flat.shape == (1, 21, 8) and torch.equal(flat[0, 7 * 2 + 4], x[2, 4])  # row-major: (r, j) -> r*s + j
    assert torch.equal(unflatten_rows(flat, (3, 7)), x)
    y = torch.randn(3, 7)
    assert torch.equal(unflatten_rows(flatten_rows(y), (3, 7)), y) and flatten_rows(None) is None
    pair = unflatten_rows((flat, flatten_rows(y)), (3, 7))
    assert torch.equal(pair[0], x) and torch.equal(pair[1], y)


@pytest.mark.parametrize("bad, match", [
    ([[0, 0, 1, 0]], "splits a sample"),  # segment 0 after segment 1
    ([[0, 1, -1, 1, -1, -1]], "splits a sample"),  # a sample with padding inside
    ([[0, 0, -2, -1]], ">= -1"),
])
def test_bad_segment_ids_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        check_segments(torch.tensor(bad))
    with pytest.raises(ValueError, match="must be"):
        packed_seq_params(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="integers"):
        packed_seq_params(torch.zeros(1, 4))


def test_position_ids_must_restart_per_sample():
    segment_ids = torch.tensor([[0, 0, 0, 1, 1, -1, -1], [-1, -1, 0, 0, 0, 0, 0]])  # trailing and leading pads
    good = torch.tensor([[0, 1, 2, 0, 1, 5, 6], [0, 0, 0, 1, 2, 3, 4]])  # pads: any position (no loss)
    packed_seq_params(segment_ids, good)
    shifted = good.clone()
    shifted[0, 3:5] += 3  # the second sample continues counting: not what THD rope applies
    with pytest.raises(ValueError, match="restart at 0"):
        packed_seq_params(segment_ids, shifted)


class _THDAttention(torch.nn.Module):
    """Stand-in for Transformer Engine's THD core attention: causal attention inside each cu_seqlens sequence.

    query [t, heads, d], key/value [t, groups, d] (megatron squeezes the batch of one) -> [t, heads * d]."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        assert attention_mask is None and packed_seq_params.qkv_format == "thd" and query.dim() == 3
        rep = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
        out = torch.empty_like(query)
        bounds = packed_seq_params.cu_seqlens_q.tolist()
        for a, b in zip(bounds[:-1], bounds[1:]):
            q, k, v = (x[a:b].transpose(0, 1) for x in (query, key, value))  # [heads, n, d]
            out[a:b] = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(0, 1)
        return out.reshape(out.shape[0], -1)


def _pad_to(x: dict, n: int, pad: torch.Tensor) -> dict:
    """A sample padded at the end to n positions (pad tokens, IGNORE labels, zero weight)."""
    from ualm_nemo.model.vocab import IGNORE_INDEX

    m = n - x["tokens"].shape[0]
    return {"tokens": torch.cat([x["tokens"], pad.repeat(m, 1)]),
            "labels": torch.cat([x["labels"], torch.full((m, x["labels"].shape[1]), IGNORE_INDEX)]),
            "loss_weights": torch.cat([x["loss_weights"], torch.zeros(m, x["loss_weights"].shape[1])])}


def _thd_forward_vs_alone(tp: int) -> dict:
    """Two packed rows ([a, b, pads], [c, pads]) through the mask path and the THD path vs each sample alone;
    tp=2 runs with sequence parallelism (the THD line of b*s tokens is what SP splits)."""
    from ualm_nemo.data.batching import collate_packed
    from ualm_nemo.distributed.parallel import init_model_parallel
    from ualm_nemo.model.builder import build_model
    from ualm_nemo.model.config import BACKBONES, AudioInputConfig, UALMConfig
    from ualm_nemo.testing.batches import random_sample

    cfg = UALMConfig(backbone=BACKBONES["tiny"], audio_in=AudioInputConfig(enabled=False))
    if tp > 1:
        cfg = cfg.with_parallel(tensor_model_parallel_size=tp, sequence_parallel=True)
    init_model_parallel(cfg.parallel, seed=4)
    model = build_model(cfg).eval()
    gen = torch.Generator().manual_seed(0)
    samples = [random_sample(cfg.vocab, n, f, gen) for n, f in ((5, 6), (7, 3), (4, 9))]
    lengths = [x["tokens"].shape[0] for x in samples]
    pad = torch.tensor(cfg.vocab.text_position_streams(cfg.vocab.pad_id))
    s = -(-(max(lengths[0] + lengths[1], lengths[2]) + 2) // tp) * tp
    batch = collate_packed([[samples[0], samples[1]], [samples[2]]], cfg.vocab, s).model_inputs()  # loader layout
    with torch.no_grad():
        alone = []
        for x, n in zip(samples, lengths):  # alone, padded to a multiple of tp (SP splits the sequence)
            x = _pad_to(x, -(-n // tp) * tp, pad)
            alone.append(model(x["tokens"][None], x["labels"][None], x["loss_weights"][None])[0, :n])
        masked = model(**batch)  # the local spec: block-causal mask
        model.ualm = cfg.with_parallel(transformer_impl="transformer_engine")
        for layer in model.decoder.layers:
            layer.self_attention.core_attention = _THDAttention()
        thd = model(**batch)
        logits = model(batch["tokens"], position_ids=batch["position_ids"], segment_ids=batch["segment_ids"])
        shapes = [tuple(x.shape) for x in logits] + [tuple(model(**batch, per_stream=True).shape)]
    expected = torch.zeros(2, s)
    expected[0, :lengths[0]], expected[0, lengths[0]:lengths[0] + lengths[1]] = alone[0], alone[1]
    expected[1, :lengths[2]] = alone[2]
    return {"thd": thd, "masked": masked, "expected": expected, "shapes": shapes}


@pytest.mark.parametrize("tp", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_thd_forward_equals_samples_alone(tp):
    out = run_distributed(tp, _thd_forward_vs_alone, tp)[0]
    torch.testing.assert_close(out["masked"], out["expected"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["thd"], out["expected"], rtol=1e-5, atol=1e-5)
    b, s = out["expected"].shape
    assert [shape[:2] for shape in out["shapes"]] == [(b, s)] * 3  # logits pair and per-stream nll back as [b, s]
