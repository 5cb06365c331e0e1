"""HF Qwen2 -> UALM backbone: the mapped model computes HF's logits, at TP1 and after resharding to TP2 / PP2.

A tiny random ``Qwen2ForCausalLM`` (every weight random, biases and norms included, so a wrong map cannot
pass) is mapped with ``hf_to_ualm`` into a UALM model at (TP1, PP1); its stream-0 logits over the text columns
must equal HF's on the same text ids. That model is saved as a TP1 dist checkpoint and loaded at (TP2, PP1)
and (TP1, PP2) in one 2-process launch (process start-up dominates the cost), which must give the same logits.
Workers write results to files: large tensors through the result queue would block a worker's exit.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch

from ualm_nemo.convert.qwen2_keymap import check_compatible, hf_to_ualm, qwen2_config_for, ualm_to_hf
from ualm_nemo.testing.dist import run_distributed

pytestmark = pytest.mark.timeout(300)

BATCH, SEQ = 2, 20
LAYOUTS = {"tp2": (2, 1), "pp2": (1, 2)}


def _cfg(tp: int = 1, pp: int = 1, **backbone):
    from dataclasses import replace

    from ualm_nemo.model.config import BACKBONES, AudioInputConfig, UALMConfig

    return UALMConfig(backbone=replace(BACKBONES["tiny"], **backbone), audio_in=AudioInputConfig(enabled=False),
                      params_dtype="fp32").with_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)


def _random_hf_model(cfg, seed: int = 0):
    """Qwen2ForCausalLM with every parameter random: norms around 1, everything else N(0, 0.1)."""
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(qwen2_config_for(cfg, attn_implementation="eager")).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.1)
    return model


def _stream_tokens(cfg, ids: torch.Tensor) -> torch.Tensor:
    """Text ids [b, s] -> UALM tokens [b, s, N]: the text id on stream 0, codebook pads on the others."""
    return torch.tensor([[cfg.vocab.text_position_streams(int(t)) for t in row] for row in ids])


def _text_logits(model, cfg, tokens: torch.Tensor) -> torch.Tensor | None:
    """Stream-0 logits over the text columns [b, s, V] on the last pipeline stage (None elsewhere).

    Megatron's forward-only schedule does the stage-to-stage sends; with no loss function it keeps the last
    stage's raw output (stream0 [b, s, vocab], codebooks) in its returned store.
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, chunk):
        return chunk(next(data_iterator)), None

    model.eval()
    with torch.no_grad():
        store = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([tokens]),
                                            model=[model], num_microbatches=1, seq_length=tokens.shape[1],
                                            micro_batch_size=tokens.shape[0], forward_only=True)
    if not parallel_state.is_pipeline_last_stage():
        return None
    stream0, _ = store[0]
    return stream0[..., : cfg.backbone.text_vocab_size].detach().clone()


def _import_at_tp1(root: str) -> None:
    """Rank 0 of 1: build, map the HF weights in, compute logits, save the TP1 checkpoint."""
    from ualm_nemo.distributed import checkpoint
    from ualm_nemo.distributed.parallel import init_model_parallel
    from ualm_nemo.model.builder import build_model

    cfg = _cfg()
    init_model_parallel(cfg.parallel, seed=1234)
    model = build_model(cfg)
    base = model.state_dict()
    inputs = torch.load(f"{root}/inputs.pt")
    model.load_state_dict(hf_to_ualm(inputs["hf"], cfg, base))
    logits = _text_logits(model, cfg, inputs["tokens"])
    checkpoint.save_checkpoint(f"{root}/ckpt", 0, [model], None, common={})
    tensors = {k: v.detach().clone() for k, v in base.items() if isinstance(v, torch.Tensor)}
    torch.save({"base": tensors, "logits": logits, "after_load": model.state_dict()}, f"{root}/tp1.pt")


def _load_at_layouts(root: str) -> None:
    """Each of 2 ranks: for every layout, load the TP1 checkpoint (resharding) and compute logits."""
    import torch.distributed as dist

    from ualm_nemo.distributed import checkpoint
    from ualm_nemo.distributed.parallel import init_model_parallel
    from ualm_nemo.model.builder import build_model

    tokens = torch.load(f"{root}/inputs.pt")["tokens"]
    out = {}
    for name, (tp, pp) in LAYOUTS.items():
        try:  # one layout failing must not hide the other's result
            cfg = _cfg(tp, pp)
            init_model_parallel(cfg.parallel, seed=99)  # another init on purpose: weights come from the checkpoint
            model = build_model(cfg)
            checkpoint.load_checkpoint(f"{root}/ckpt/iter_0000000", [model])
            out[name] = _text_logits(model, cfg, tokens)
        except Exception:
            out[name] = traceback.format_exc()
    torch.save(out, f"{root}/layouts_rank{dist.get_rank()}.pt")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """HF model, its logits, and the TP1 import (base state dict + logits); the checkpoint lies under root."""
    root = tmp_path_factory.mktemp("qwen2_parity")
    cfg = _cfg()
    hf = _random_hf_model(cfg)
    ids = torch.randint(0, cfg.backbone.text_vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        hf_logits = hf(input_ids=ids).logits
    hf_state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    torch.save({"hf": hf_state, "tokens": _stream_tokens(cfg, ids)}, root / "inputs.pt")
    run_distributed(1, _import_at_tp1, str(root))
    return {"root": root, "cfg": cfg, "hf": hf, "hf_state": hf_state, "hf_logits": hf_logits,
            **torch.load(root / "tp1.pt")}


@pytest.fixture(scope="module")
def layouts(converted):
    root: Path = converted["root"]
    run_distributed(2, _load_at_layouts, str(root))
    return [torch.load(root / f"layouts_rank{r}.pt") for r in range(2)]


def test_tp1_logits_match_hf(converted):
    assert converted["hf_logits"].shape == (BATCH, SEQ, converted["cfg"].backbone.text_vocab_size)
    assert converted["hf_logits"].std() > 0.3  # random weights give spread-out logits, not a flat row
    torch.testing.assert_close(converted["logits"], converted["hf_logits"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_resharded_logits_match_hf(converted, layouts, layout):
    tp, pp = LAYOUTS[layout]
    for rank, results in enumerate(layouts):
        got = results[layout]
        assert not isinstance(got, str), f"{layout} rank {rank} failed:\n{got}"
        if pp > 1 and rank < pp - 1:
            assert got is None  # not the last stage
            continue
        torch.testing.assert_close(got, converted["hf_logits"], atol=1e-5, rtol=1e-5, msg=f"{layout} rank {rank}")


def test_round_trip_is_bit_identical(converted):
    cfg, base, hf_state = converted["cfg"], converted["base"], converted["hf_state"]
    mapped = hf_to_ualm(hf_state, cfg, base)
    back = ualm_to_hf(mapped, cfg)
    assert back.keys() == hf_state.keys()
    for key, value in hf_state.items():
        assert torch.equal(back[key], value), key
    # what HF does not have is kept from base: the specials' rows, vocabulary padding, the audio parts
    vocab = cfg.backbone.text_vocab_size
    for key in ("embedding.text.weight", "heads.text_head.weight"):
        assert torch.equal(mapped[key][vocab:], base[key][vocab:]), key
    for key in ("embedding.audio.weight", "heads.audio_head.weight", "heads.stream_embedding"):
        assert torch.equal(mapped[key], base[key]), key
    # the model that loaded the map holds exactly the mapped tensors
    after = converted["after_load"]
    for key, value in mapped.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(after[key], value), key
    check_compatible(converted["hf"].config, cfg)


def test_mismatches_raise_clear_errors(converted):
    cfg, base, hf_state = converted["cfg"], converted["base"], converted["hf_state"]
    wrong = _cfg(num_query_groups=4)
    with pytest.raises(ValueError, match=r"num_key_value_heads: HF 2 != UALM 4"):
        check_compatible(converted["hf"].config, wrong)
    with pytest.raises(ValueError, match=r"k_proj.weight'.*\(32, 64\).*\(64, 64\)"):
        hf_to_ualm(hf_state, wrong, base)
    with pytest.raises(ValueError, match=r"missing \['model.layers.3.mlp.up_proj.weight'\]"):
        hf_to_ualm({k: v for k, v in hf_state.items() if k != "model.layers.3.mlp.up_proj.weight"}, cfg, base)
    with pytest.raises(ValueError, match=r"unexpected \['model.layers.4.input_layernorm.weight'\]"):
        hf_to_ualm({**hf_state, "model.layers.4.input_layernorm.weight": torch.ones(64)}, cfg, base)
    with pytest.raises(ValueError, match=r"tie_word_embeddings_in_source"):
        hf_to_ualm({k: v for k, v in hf_state.items() if k != "lm_head.weight"}, cfg, base)
    bad_base = {**base, "decoder.final_layernorm.weight": torch.ones(32)}
    with pytest.raises(ValueError, match=r"final_layernorm.weight'.*\(32,\).*\(64,\)"):
        hf_to_ualm(hf_state, cfg, bad_base)


def test_tied_source_copies_embedding_into_head(converted):
    from dataclasses import replace

    cfg, base, hf_state = converted["cfg"], converted["base"], converted["hf_state"]
    tied = replace(cfg, backbone=replace(cfg.backbone, tie_word_embeddings_in_source=True))
    mapped = hf_to_ualm({k: v for k, v in hf_state.items() if k != "lm_head.weight"}, tied, base)
    vocab = cfg.backbone.text_vocab_size
    assert torch.equal(mapped["heads.text_head.weight"][:vocab], hf_state["model.embed_tokens.weight"])


def test_in_place_map_matches_the_copying_map(converted):
    """The importer's in_place mode writes the text tables' HF rows into base: same result, no table copy."""
    from ualm_nemo.convert.qwen2_keymap import iter_hf_to_ualm, resolve_hf_sources

    cfg, base, hf_state = converted["cfg"], converted["base"], converted["hf_state"]
    mapped = hf_to_ualm(hf_state, cfg, base)
    target = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in base.items()}
    sources = resolve_hf_sources({k: tuple(v.shape) for k, v in hf_state.items()}, cfg)
    for key, tensor in iter_hf_to_ualm(hf_state.__getitem__, sources, cfg, target, in_place=True):
        if key in ("embedding.text.weight", "heads.text_head.weight"):
            assert tensor is target[key]
        target[key] = tensor
    for key, value in mapped.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(target[key], value), key
