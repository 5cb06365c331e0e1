"""GPU only: the Transformer Engine layer spec computes what the local spec computes, from the same weights.

TE fuses each block's pre-norm into the following linear layer, so the local spec's
``input_layernorm.weight`` / ``pre_mlp_layernorm.weight`` become ``linear_qkv.layer_norm_weight`` /
``mlp.linear_fc1.layer_norm_weight``; every other tensor keeps its name.
"""

from __future__ import annotations

import pytest
import torch

from ualm_nemo.testing.dist import run_distributed

pytestmark = pytest.mark.gpu

_TE_NAMES = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
             "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}


def _to_te_names(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        for local, te in _TE_NAMES.items():
            if key.endswith(local):
                key = key[: -len(local)] + te
        out[key] = value
    return out


def _logits_local_vs_te() -> dict:
    from ualm_nemo.distributed.parallel import init_model_parallel
    from ualm_nemo.model.builder import build_model
    from ualm_nemo.model.config import BACKBONES, AudioInputConfig, UALMConfig
    from ualm_nemo.testing.batches import random_batch

    local_cfg = UALMConfig(backbone=BACKBONES["tiny"], audio_in=AudioInputConfig(enabled=False))
    te_cfg = local_cfg.with_parallel(transformer_impl="transformer_engine")
    init_model_parallel(local_cfg.parallel, seed=0)
    local = build_model(local_cfg).eval()
    te = build_model(te_cfg).eval()
    state = {k: v for k, v in _to_te_names(local.state_dict()).items() if not k.endswith("_extra_state")}
    missing, unexpected = te.load_state_dict(state, strict=False)
    batch = random_batch(local_cfg.vocab, 2, seed=0)
    tokens = batch["tokens"].cuda()
    with torch.no_grad():
        a, b = local(tokens), te(tokens)
    return {"missing": [k for k in missing if not k.endswith("_extra_state")], "unexpected": list(unexpected),
            "max_diff": max(float((x - y).abs().max()) for x, y in zip(a, b))}


def test_te_spec_matches_local_spec():
    out = run_distributed(1, _logits_local_vs_te)[0]
    assert out["missing"] == [] and out["unexpected"] == []
    assert out["max_diff"] < 2e-3  # fp32 weights; TE kernels may use TF32 internally
