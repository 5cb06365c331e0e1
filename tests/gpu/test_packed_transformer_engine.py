"""GPU only: packed rows on the Transformer Engine spec run as THD sequences (model/packed_seq.py) and give each
sample the per-position loss it gets alone (bf16, the dtype of the 7B runs: TE's THD kernels are fused
flash/cuDNN attention), and the backward pass through them is finite."""

from __future__ import annotations

import pytest
import torch

from ualm_nemo.testing.dist import run_distributed

pytestmark = pytest.mark.gpu


def _packed_te_vs_alone() -> dict:
    from ualm_nemo.data.batching import collate_packed
    from ualm_nemo.distributed.parallel import init_model_parallel
    from ualm_nemo.model.builder import build_model
    from ualm_nemo.model.config import BACKBONES, AudioInputConfig, UALMConfig
    from ualm_nemo.testing.batches import random_sample

    cfg = UALMConfig(backbone=BACKBONES["tiny"], audio_in=AudioInputConfig(enabled=False), params_dtype="bf16")
    cfg = cfg.with_parallel(transformer_impl="transformer_engine")
    init_model_parallel(cfg.parallel, seed=0)
    model = build_model(cfg).eval()
    gen = torch.Generator().manual_seed(0)
    samples = [random_sample(cfg.vocab, n, f, gen) for n, f in ((5, 6), (7, 3), (4, 9), (9, 12))]
    lengths = [x["tokens"].shape[0] for x in samples]
    rows = [[0, 1], [2], [3]]  # two samples + padding, one + padding, one filling the row
    seq = max(lengths[0] + lengths[1], lengths[2], lengths[3])
    packed_rows = collate_packed([[samples[i] for i in r] for r in rows], cfg.vocab, seq)
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in packed_rows.model_inputs().items()}
    with torch.no_grad():
        alone = [model(x["tokens"][None].cuda(), x["labels"][None].cuda(), x["loss_weights"][None].cuda())[0]
                 for x in samples]
        packed = model(**batch)
    expected = torch.zeros_like(packed)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            expected[r, start:start + lengths[i]] = alone[i]
            start += lengths[i]
    model.train()
    model(**batch).float().sum().backward()
    grads_finite = all(bool(p.grad.isfinite().all()) for p in model.parameters() if p.grad is not None)
    return {"packed": packed.float().cpu(), "expected": expected.float().cpu(), "grads_finite": grads_finite,
            "real": (batch["segment_ids"] >= 0).cpu()}


def test_packed_te_rows_equal_samples_alone():
    pytest.importorskip("transformer_engine")
    out = run_distributed(1, _packed_te_vs_alone)[0]
    real = out["real"]
    # bf16 activations; THD and unpacked runs differ in kernels and GEMM shapes, not in what is attended
    torch.testing.assert_close(out["packed"][real], out["expected"][real], rtol=2e-2, atol=2e-2)
    assert float(out["packed"][~real].abs().max()) == 0.0  # padding carries no loss
    assert out["grads_finite"]
