"""GPU only: a dist checkpoint written by the local spec loads into the Transformer Engine spec and computes the
same logits (megatron maps the local spec's separate norms onto TE's fused ``layer_norm_weight`` keys), so CPU
conversions and CPU-trained checkpoints feed GPU training unchanged."""

from __future__ import annotations

import pytest

from ualm_nemo.testing.dist import run_distributed

pytestmark = pytest.mark.gpu


def _local_checkpoint_into_te(root: str) -> dict:
    import torch

    from ualm_nemo.distributed import checkpoint
    from ualm_nemo.distributed.parallel import init_model_parallel
    from ualm_nemo.model.builder import build_model
    from ualm_nemo.model.config import BACKBONES, AudioInputConfig, UALMConfig
    from ualm_nemo.testing.batches import random_batch

    local_cfg = UALMConfig(backbone=BACKBONES["tiny"], audio_in=AudioInputConfig(enabled=False))
    init_model_parallel(local_cfg.parallel, seed=0)
    local = build_model(local_cfg).eval()
    checkpoint.save_checkpoint(root, 0, [local], None, common={})
    te = build_model(local_cfg.with_parallel(transformer_impl="transformer_engine")).eval()
    checkpoint.load_checkpoint(f"{root}/iter_0000000", [te], None, restore_rng=False)
    tokens = random_batch(local_cfg.vocab, 2, seed=0).tokens.cuda()
    with torch.no_grad():
        a, b = local(tokens), te(tokens)
    return {"max_diff": max(float((x - y).abs().max()) for x, y in zip(a, b))}


def test_local_checkpoint_runs_on_transformer_engine(tmp_path):
    out = run_distributed(1, _local_checkpoint_into_te, str(tmp_path))[0]
    assert out["max_diff"] < 2e-3  # fp32 weights; TE kernels may use TF32 internally
