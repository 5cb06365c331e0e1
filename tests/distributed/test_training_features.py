"""GPU training features that the local spec runs on CPU change nothing but memory / overlap: activation recompute
(selective: core attention, also on the SDPA backend; full: uniform units of 1 and of all layers; the block
method and MLP recompute are mapped in tests/model/test_gpu_features_config.py), overlap of the grad reduce and of the param all-gather (DP2, distributed optimizer), and bf16 grad
reduction (bf16 tolerance). One launch of two gloo processes (DP2) trains every variant from the same weights.
"""

from __future__ import annotations

import pytest

from ualm_nemo.testing.dist import run_distributed

pytestmark = pytest.mark.timeout(300)

VARIANTS = {  # name: (recompute, parallel, model keys)
    "base": ({}, {}, {}),
    "selective": ({"granularity": "selective"}, {}, {}),
    "full-uniform-1": ({"granularity": "full", "method": "uniform", "num_layers": 1}, {}, {}),
    "full-uniform-all": ({"granularity": "full", "method": "uniform", "num_layers": 4}, {}, {}),
    "overlap-grad": ({}, {"overlap_grad_reduce": True}, {}),
    "overlap-both": ({}, {"overlap_grad_reduce": True, "overlap_param_gather": True}, {}),
    "sdpa": ({}, {}, {"attention_backend": "sdpa"}),
    "sdpa-selective": ({"granularity": "selective"}, {}, {"attention_backend": "sdpa"}),
    "bf16": ({}, {}, {"params_dtype": "bf16"}),
    "bf16-reduce": ({}, {"grad_reduce_in_bf16": True}, {"params_dtype": "bf16"}),
}


def _train_variants() -> dict:
    from megatron.core import parallel_state as ps

    from ualm_nemo.distributed.optim import OptimConfig
    from ualm_nemo.distributed.parallel import init_model_parallel
    from ualm_nemo.model.config import BACKBONES, AudioInputConfig, RecomputeConfig, UALMConfig
    from ualm_nemo.model.builder import transformer_config
    from ualm_nemo.testing.batches import random_batch
    from ualm_nemo.training.engine import MegatronEngine

    out = {}
    for name, (recompute, parallel, model) in VARIANTS.items():
        cfg = UALMConfig(backbone=BACKBONES["tiny"], audio_in=AudioInputConfig(adapter="mlp", random_encoder=True),
                         recompute=RecomputeConfig(**recompute), **model).with_parallel(**parallel).validate(2)
        init_model_parallel(cfg.parallel, seed=1234)  # the same weights for every variant
        dp_rank = ps.get_data_parallel_rank()
        engine = MegatronEngine(cfg, OptimConfig(lr=3e-3, min_lr=3e-3, weight_decay=0.0), max_steps=10)
        batches = [[random_batch(cfg.vocab, 2, 2 * step + dp_rank, with_audio_input=True)] for step in range(2)]
        losses, norms, grads = [], [], None
        for step, microbatches in enumerate(batches):
            result = engine.train_step(microbatches)
            losses.append(result.loss)
            norms.append(result.grad_norm)
            if step == 0:  # this rank's gradient buffer after the first step's (reduced) backward
                grads = {n: p.main_grad.float().clone() for n, p in engine.chunks[0].named_parameters()
                         if p.requires_grad}
        after = engine.eval_loss([random_batch(cfg.vocab, 2, 10 + dp_rank, with_audio_input=True)])
        tc = transformer_config(cfg)
        out[name] = {"loss": losses, "grad_norm": norms, "after": after, "grads": grads,
                     "weights": {n: p.detach().float().clone() for n, p in engine.chunks[0].named_parameters()},
                     "recompute": (tc.recompute_granularity, tc.recompute_method, tc.recompute_num_layers),
                     "grad_dtype": str(engine.ddp[0].buffers[0].grad_dtype)}
        del engine
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed(2, _train_variants, timeout=280)


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("name,reference", [
    ("selective", "base"), ("full-uniform-1", "base"), ("full-uniform-all", "base"), ("overlap-grad", "base"),
    ("overlap-both", "base"), ("sdpa-selective", "sdpa")])
def test_same_losses_gradients_and_weights(results, name, reference):
    for rank, got in results.items():
        ref, var = got[reference], got[name]
        assert var["loss"] == pytest.approx(ref["loss"], rel=1e-6, abs=1e-6), f"rank {rank}"
        assert var["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5), f"rank {rank}"
        assert var["after"] == pytest.approx(ref["after"], rel=1e-6, abs=1e-6), f"rank {rank}"  # gathered params
        assert _max_diff(var["grads"], ref["grads"]) < 1e-6, f"rank {rank}"
        assert _max_diff(var["weights"], ref["weights"]) < 1e-6, f"rank {rank}"
    base = results[0]["base"]
    assert base["after"] < base["loss"][0] and base["grad_norm"][0] > 0  # the steps trained something


def test_recompute_maps_to_megatron_and_bf16_reduce_stays_close(results):
    r = results[0]
    assert r["base"]["recompute"] == (None, None, None)
    assert r["selective"]["recompute"] == ("selective", None, None)
    assert r["full-uniform-1"]["recompute"] == ("full", "uniform", 1)
    assert r["bf16"]["grad_dtype"] == "torch.float32" and r["bf16-reduce"]["grad_dtype"] == "torch.bfloat16"
    for rank, got in results.items():
        assert got["bf16-reduce"]["loss"][0] == got["bf16"]["loss"][0], f"rank {rank}"  # same forward
        assert got["bf16-reduce"]["loss"] == pytest.approx(got["bf16"]["loss"], rel=2e-2), f"rank {rank}"
        assert got["bf16-reduce"]["grad_norm"] == pytest.approx(got["bf16"]["grad_norm"], rel=5e-2), f"rank {rank}"
