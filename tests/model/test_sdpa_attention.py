"""SDPAAttention computes what megatron's DotProductAttention computes: alone and inside the model, at TP1/TP2.

Real processes (gloo) for what needs megatron's parallel state; one launch per tensor-parallel size, each
comparing every case, so the file costs two process starts.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ualm_nemo.testing.dist import run_distributed

TOL = dict(rtol=1e-5, atol=1e-5)


def _tiny(attention_backend: str, tp: int = 1):
    from ualm_nemo.model.config import BACKBONES, AudioInputConfig, UALMConfig

    return UALMConfig(backbone=BACKBONES["tiny"], audio_in=AudioInputConfig(enabled=False),
                      attention_backend=attention_backend).with_parallel(tensor_model_parallel_size=tp)


def _attention_cases() -> dict:
    """Each case: megatron's and SDPA's output and q/k/v gradients on the same random inputs (fp32, TP1)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from ualm_nemo.model.attention_mask import packed_attention_mask
    from ualm_nemo.model.builder import transformer_config
    from ualm_nemo.model.sdpa_attention import SDPAAttention

    gen = torch.Generator().manual_seed(0)
    s, b, d = 12, 2, 16
    segments = torch.tensor([[0] * 5 + [1] * 4 + [-1] * 3, [0] * 9 + [1] * 3])  # packed rows, padding -1
    everything_masked = torch.ones(s, s, dtype=torch.bool).triu(1).repeat(b, 1, 1, 1)  # causal, True = masked
    everything_masked[0, 0, 3] = True  # ... and one query row that sees no key at all (megatron: uniform)
    cases = {  # name: (num_query_groups, sq, attention_mask)
        "causal": (4, s, None), "causal_gqa": (2, s, None), "packed_gqa": (2, s, packed_attention_mask(segments)),
        "row_without_keys": (2, s, everything_masked),
        "decode_step": (2, 1, torch.rand(b, 1, 1, s, generator=gen) < 0.3),  # one query over a KV cache
    }
    out = {}
    for name, (groups, sq, mask) in cases.items():
        cfg = transformer_config(dataclasses.replace(
            _tiny("megatron"), backbone=dataclasses.replace(_tiny("megatron").backbone, num_query_groups=groups)))
        q = torch.randn(sq, b, 4, d, generator=gen)
        k, v = (torch.randn(s, b, groups, d, generator=gen) for _ in range(2))
        results = []
        for cls in (DotProductAttention, SDPAAttention):
            module = cls(config=cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            context = module(*leaves, mask, attn_mask_type=AttnMaskType.causal)
            (context * torch.linspace(-1, 1, context.numel()).view_as(context)).sum().backward()
            results.append({"out": context.detach(), "grads": [t.grad for t in leaves]})
        out[name] = results
    return out


def _packed_batch(vocab, seed: int):
    """Two rows of two samples each, padded at the end (the loader's packing: positions and segments)."""
    from ualm_nemo.data.batching import collate_packed
    from ualm_nemo.testing.batches import random_sample

    gen = torch.Generator().manual_seed(seed)
    rows = [[random_sample(vocab, 4 + i, 3 + j, gen) for j in range(2)] for i in range(2)]
    return collate_packed(rows, vocab, max(sum(s["tokens"].shape[0] for s in row) for row in rows) + 2)


def _loss_and_grads(model, batch) -> dict:
    model.zero_grad(set_to_none=True)
    loss = model(**batch.model_inputs())  # [b, s]
    loss.sum().backward()
    return {"loss": loss.detach(), "grads": {n: p.grad.clone() for n, p in model.named_parameters()
                                             if p.grad is not None}}


def _models_compared(tp: int) -> dict:
    """Tiny model with megatron's attention vs SDPA's (same weights): loss and gradients, plain and packed rows."""
    from ualm_nemo.distributed.parallel import init_model_parallel
    from ualm_nemo.model.builder import build_model
    from ualm_nemo.testing.batches import random_batch

    init_model_parallel(_tiny("megatron", tp).parallel, seed=7)
    megatron = build_model(_tiny("megatron", tp))
    sdpa = build_model(_tiny("sdpa", tp))
    sdpa.load_state_dict(megatron.state_dict())
    vocab = _tiny("sdpa").vocab
    batches = {"right_padded": random_batch(vocab, 2, seed=3), "packed": _packed_batch(vocab, seed=4)}
    out = {"core": type(sdpa.decoder.layers[0].self_attention.core_attention).__name__}
    for name, batch in batches.items():
        out[name] = [_loss_and_grads(model, batch) for model in (megatron, sdpa)]
    if tp == 1:
        out["attention"] = _attention_cases()
    return out


@pytest.fixture(scope="module")
def tp1():
    return run_distributed(1, _models_compared, 1)


@pytest.fixture(scope="module")
def tp2():
    return run_distributed(2, _models_compared, 2)


def test_module_equals_dot_product_attention(tp1):
    for name, (megatron, sdpa) in tp1[0]["attention"].items():
        torch.testing.assert_close(sdpa["out"], megatron["out"], **TOL, msg=name)
        for got, want in zip(sdpa["grads"], megatron["grads"]):
            assert torch.isfinite(got).all(), name
            torch.testing.assert_close(got, want, **TOL, msg=name)


@pytest.mark.parametrize("layout", ["tp1", "tp2"])
def test_model_loss_and_grads_equal_megatron_attention(layout, request):
    for rank, out in request.getfixturevalue(layout).items():
        assert out["core"] == "SDPAAttention"
        for name in ("right_padded", "packed"):
            megatron, sdpa = out[name]
            assert megatron["loss"].sum() > 1.0  # a real loss, not an empty mask
            torch.testing.assert_close(sdpa["loss"], megatron["loss"], **TOL, msg=f"{name} rank {rank}")
            assert sdpa["grads"].keys() == megatron["grads"].keys()
            for param, grad in megatron["grads"].items():
                torch.testing.assert_close(sdpa["grads"][param], grad, **TOL, msg=f"{name} {param} rank {rank}")


def test_bad_attention_backend_is_refused():
    from ualm_nemo.model.config import ConfigError
    from ualm_nemo.model.config import UALMConfig

    with pytest.raises(ConfigError, match="model.attention_backend"):
        _tiny("flash").validate()
    with pytest.raises(ConfigError, match="model.attention_backend"):
        UALMConfig.from_dict({"backbone": "tiny", "attention_backend": "flash"})
    with pytest.raises(ConfigError, match="model.attention_backend=sdpa .*transformer_impl=local"):
        _tiny("sdpa").with_parallel(transformer_impl="transformer_engine").validate()


def test_attention_backend_from_the_command_line():
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from ualm_nemo.training.run_config import run_config_from_dict

    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[2] / "conf"), version_base=None):
        cfg = OmegaConf.to_container(compose("train", overrides=["model.attention_backend=sdpa"]), resolve=True)
    assert run_config_from_dict(cfg).model.attention_backend == "sdpa"


def test_sdpa_spec_is_a_copy():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from ualm_nemo.model.builder import layer_spec
    from ualm_nemo.model.sdpa_attention import SDPAAttention

    core = lambda spec: spec.submodules.self_attention.submodules.core_attention  # noqa: E731
    assert core(layer_spec(_tiny("sdpa"))) is SDPAAttention
    assert core(layer_spec(_tiny("megatron"))) is DotProductAttention
