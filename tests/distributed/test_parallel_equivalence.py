"""The same initial weights give the same loss and gradients at every parallel layout (real gloo processes).

A reference checkpoint is written at (TP1, PP1); each layout loads it (resharding on load), takes two optimizer
steps on the same global batch and reports losses, gradient norms and the loss after the steps. All must match
the single-process run to fp32 tolerance.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ualm_nemo.testing.dist import run_distributed

pytestmark = pytest.mark.timeout(600)

GLOBAL_BATCHES = [(0, 1), (2, 3)]  # per step: micro-batch seeds of the global batch (2 samples each)


def _tiny(tp: int = 1, pp: int = 1, head: str = "shared", sp: bool = False, vpp: int | str | None = None):
    """``vpp="2+features"``: VPP2 with the overlap options and full recompute on (per model chunk)."""
    from ualm_nemo.model.config import BACKBONES, AudioInputConfig, AudioOutputConfig, RecomputeConfig, UALMConfig

    features = isinstance(vpp, str)
    cfg = UALMConfig(backbone=BACKBONES["tiny"], audio_in=AudioInputConfig(adapter="mlp", random_encoder=True),
                     audio_out=AudioOutputConfig(head=head),
                     recompute=RecomputeConfig(granularity="full") if features else RecomputeConfig())
    return cfg.with_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, sequence_parallel=sp,
                             virtual_pipeline_model_parallel_size=int(vpp[0]) if features else vpp,
                             overlap_grad_reduce=features, overlap_param_gather=features)


def _batch(vocab, seed: int):
    """Two samples: an audio-understanding one (encoder + adapter + splice) and a text-to-audio one."""
    from ualm_nemo.testing.batches import random_batch

    return random_batch(vocab, 2, seed, with_audio_input=True)


def _save_reference(root: str, head: str) -> None:
    from ualm_nemo.distributed import checkpoint
    from ualm_nemo.distributed.parallel import init_model_parallel
    from ualm_nemo.model.builder import build_model

    cfg = _tiny(head=head)
    init_model_parallel(cfg.parallel, seed=1234)
    checkpoint.save_checkpoint(root, 0, [build_model(cfg)], None, common={})


def _train_from_reference(root: str, tp: int, pp: int, head: str, sp: bool = False,
                          vpp: int | str | None = None) -> dict:
    import torch

    from megatron.core import parallel_state as ps

    from ualm_nemo.distributed.optim import OptimConfig
    from ualm_nemo.distributed.parallel import init_model_parallel
    from ualm_nemo.training.engine import MegatronEngine
    from ualm_nemo.training.validation import ValidationLoss

    cfg = _tiny(tp, pp, head, sp, vpp)
    init_model_parallel(cfg.parallel, seed=99)  # a different init on purpose: the weights come from the checkpoint
    engine = MegatronEngine(cfg, OptimConfig(lr=3e-3, min_lr=3e-3, weight_decay=0.0), max_steps=10)
    engine.load(f"{root}/iter_0000000", load_optimizer=False)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    vocab = cfg.vocab
    out = {"loss": [], "grad_norm": []}
    for seeds in GLOBAL_BATCHES:
        mine = seeds[dp_rank::dp]  # data parallel ranks split the global batch
        result = engine.train_step([_batch(vocab, seed) for seed in mine])
        out["loss"].append(result.loss)
        out["grad_norm"].append(result.grad_norm)
    held_out = [dataclasses.replace(_batch(vocab, seed), tasks=["understanding", "tta"])
                for seed in (10, 11)[dp_rank::dp]]
    out["after"] = engine.eval_loss(held_out)
    # the other forward-only passes over the same schedule: validation's report, DPO's per-row log-probs
    objective = ValidationLoss(vocab.num_codebooks)
    out["validation"] = objective.summarise(engine.evaluate(held_out, objective))
    rows = engine.row_log_probs(held_out)  # on the last stage only; per DP rank's own rows
    out["row_logps"] = torch.cat([r["row_logps"] for r in rows]) if rows and dp == 1 else None
    out["layers"] = [[layer.layer_number for layer in chunk.decoder.layers] for chunk in engine.chunks]  # 1-based
    return out


@pytest.fixture(scope="module", params=["shared", "per_codebook"])
def reference(request, tmp_path_factory):
    root = str(tmp_path_factory.mktemp(f"ref_{request.param}"))
    run_distributed(1, _save_reference, root, request.param)
    single = run_distributed(1, _train_from_reference, root, 1, 1, request.param)[0]
    return root, request.param, single


@pytest.mark.parametrize("tp,pp,world,sp,vpp", [(2, 1, 2, False, None), (1, 2, 2, False, None),
                                                (1, 1, 2, False, None), (2, 1, 2, True, None), (1, 2, 2, False, 2),
                                                (1, 2, 2, False, "2+features")],
                         ids=["tp2", "pp2", "dp2", "tp2-sp", "pp2-vpp2", "pp2-vpp2-overlap-recompute"])
def test_layout_matches_single_process(reference, tp, pp, world, sp, vpp):
    """pp2-vpp2: two model chunks per rank (global layers 0, 2 on rank 0; 1, 3 on rank 1), interleaved schedule."""
    root, head, single = reference
    results = run_distributed(world, _train_from_reference, root, tp, pp, head, sp, vpp)
    assert single["loss"][0] > 1.0  # a real loss, not an empty mask
    for rank, got in results.items():
        assert got["loss"] == pytest.approx(single["loss"], rel=1e-5, abs=1e-5), f"rank {rank}"
        assert got["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-4), f"rank {rank}"
        assert got["after"] == pytest.approx(single["after"], rel=1e-5, abs=1e-5), f"rank {rank}"
        assert got["validation"] == pytest.approx(single["validation"], rel=1e-5, abs=1e-5), f"rank {rank}"
        if got["row_logps"] is not None:  # the last stage of a DP1 layout: every row's log-probs
            assert torch.allclose(got["row_logps"], single["row_logps"], rtol=1e-5, atol=1e-4), f"rank {rank}"
    assert sum(got["row_logps"] is not None for got in results.values()) >= (world if pp == 1 and tp > 1 else 1) \
        or world // (tp * pp) > 1
    assert single["after"] < single["loss"][0]  # the steps changed the weights
    if vpp:  # megatron's interleaved placement: chunk c of rank r holds global layer c * PP + r (one each here)
        assert [results[r]["layers"] for r in (0, 1)] == [[[1], [3]], [[2], [4]]]


def _gradients_as_checkpoint(root: str, out: str, tp: int, pp: int, head: str, sp: bool,
                             vpp: int | None = None) -> None:
    """One step's gradients written as a dist checkpoint (grads copied over the weights), so Megatron's own
    resharding maps every layout's gradient shards (fused QKV groups, SwiGLU halves, PP layer offsets) to TP1."""
    import torch

    from ualm_nemo.distributed import checkpoint
    from ualm_nemo.distributed.optim import OptimConfig
    from ualm_nemo.distributed.parallel import init_model_parallel
    from ualm_nemo.training.engine import MegatronEngine

    cfg = _tiny(tp, pp, head, sp, vpp)
    init_model_parallel(cfg.parallel, seed=99)
    engine = MegatronEngine(cfg, OptimConfig(lr=3e-3, min_lr=3e-3, weight_decay=0.0, clip_grad=0.0), max_steps=10)
    engine.load(f"{root}/iter_0000000", load_optimizer=False)
    engine.train_step([_batch(cfg.vocab, seed) for seed in GLOBAL_BATCHES[0]])  # DP=1: the whole global batch
    with torch.no_grad():
        for param in (p for chunk in engine.chunks for p in chunk.parameters()):
            if param.requires_grad:
                param.copy_(param.main_grad)
    checkpoint.save_checkpoint(out, 0, engine.chunks, None, common={})


def _compare_gradients(single: str, layout: str, head: str) -> dict:
    """Load both gradient checkpoints at TP1 and compare every tensor."""
    import torch

    from ualm_nemo.distributed import checkpoint
    from ualm_nemo.distributed.parallel import init_model_parallel
    from ualm_nemo.model.builder import build_model

    cfg = _tiny(head=head)
    init_model_parallel(cfg.parallel, seed=0)
    loaded = []
    for path in (single, layout):
        model = build_model(cfg)
        checkpoint.load_checkpoint(f"{path}/iter_0000000", [model], None, restore_rng=False)
        loaded.append({k: v for k, v in model.state_dict().items() if hasattr(v, "shape")})
    mismatched, nonzero = [], 0
    for key, ref in loaded[0].items():
        if not torch.allclose(loaded[1][key], ref, rtol=1e-4, atol=1e-6):
            mismatched.append((key, float((loaded[1][key] - ref).abs().max())))
        nonzero += int(ref.abs().sum() > 0)
    return {"mismatched": mismatched, "nonzero": nonzero, "total": len(loaded[0])}


@pytest.fixture(scope="module")
def single_gradients(tmp_path_factory):
    """Reference weights (shared head) and the gradients of one step at (TP1, PP1)."""
    root = str(tmp_path_factory.mktemp("grad_ref"))
    run_distributed(1, _save_reference, root, "shared")
    out = str(tmp_path_factory.mktemp("grad_single"))
    run_distributed(1, _gradients_as_checkpoint, root, out, 1, 1, "shared", False)
    return root, out


@pytest.mark.parametrize("tp,pp,sp,vpp", [(2, 1, False, None), (1, 2, False, None), (2, 1, True, None),
                                          (1, 2, False, 2)], ids=["tp2", "pp2", "tp2-sp", "pp2-vpp2"])
def test_gradients_match_single_process(single_gradients, tmp_path, tp, pp, sp, vpp):
    """Every parameter's gradient, not only the norm (the loss/norm test above covers both head types)."""
    root, single = single_gradients
    run_distributed(2, _gradients_as_checkpoint, root, str(tmp_path / "layout"), tp, pp, "shared", sp, vpp)
    out = run_distributed(1, _compare_gradients, single, str(tmp_path / "layout"), "shared")[0]
    assert out["mismatched"] == []
    assert out["nonzero"] > out["total"] // 2  # real gradients, not an all-zero comparison
