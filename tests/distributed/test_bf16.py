"""bf16 parameters (the GPU training dtype) train on the Megatron path: our own parameters follow params_dtype."""

from __future__ import annotations

import pytest

from ualm_nemo.testing.dist import run_distributed


def _bf16_losses(head: str) -> dict:
    import torch

    from ualm_nemo.distributed.optim import OptimConfig
    from ualm_nemo.distributed.parallel import init_model_parallel
    from ualm_nemo.model.config import AudioInputConfig, AudioOutputConfig, BACKBONES, UALMConfig
    from ualm_nemo.testing.batches import random_batch
    from ualm_nemo.training.engine import MegatronEngine

    cfg = UALMConfig(backbone=BACKBONES["tiny"], audio_in=AudioInputConfig(random_encoder=True), params_dtype="bf16",
                     audio_out=AudioOutputConfig(head=head))
    init_model_parallel(cfg.parallel, seed=1)
    engine = MegatronEngine(cfg, OptimConfig(lr=3e-3), max_steps=5)
    # megatron's local spec keeps torch norms in fp32 (its Float16Module would cast them; we do not wrap)
    not_bf16 = [n for n, p in engine.chunks[0].named_parameters()
                if p.requires_grad and p.dtype != torch.bfloat16 and "layernorm" not in n]
    batch = random_batch(cfg.vocab, 2, 0, with_audio_input=True)
    return {"losses": [engine.train_step([batch]).loss for _ in range(4)], "not_bf16": not_bf16}


@pytest.mark.parametrize("head", ["shared", "per_codebook"])
def test_bf16_trains(head):
    out = run_distributed(1, _bf16_losses, head)[0]
    assert out["not_bf16"] == []  # embeddings, heads, stream embeddings, adapter
    assert all(x == x for x in out["losses"]) and out["losses"][-1] < out["losses"][0] - 0.5
