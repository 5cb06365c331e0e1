"""Each megatron-core fix in ualm_nemo.compat.mcore_patches guards against an upstream behaviour that still exists.

Every check first reproduces the upstream failure without the fix (so this test fails, and the fix can go, the
day megatron-core changes), then shows the fixed behaviour. One process, world size 1, distributed optimizer.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ualm_nemo.testing.dist import run_distributed


def _optimizer(seed: int):
    import torch
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from ualm_nemo.distributed.optim import wrap_ddp
    from ualm_nemo.distributed.parallel import init_model_parallel
    from ualm_nemo.model.builder import build_model
    from ualm_nemo.model.config import BACKBONES, AudioInputConfig, UALMConfig

    cfg = UALMConfig(backbone=BACKBONES["tiny"], audio_in=AudioInputConfig(enabled=False))
    init_model_parallel(cfg.parallel, seed=seed)
    model = build_model(cfg)
    ddp = wrap_ddp([model], cfg)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, use_distributed_optimizer=True,
                                                 params_dtype=torch.float32), ddp)
    return cfg, model, ddp, opt


def _step(cfg, ddp, opt) -> None:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from ualm_nemo.testing.batches import random_batch
    from functools import partial

    from ualm_nemo.training.engine import _forward_step
    from ualm_nemo.training.objectives import LMObjective

    ddp[0].zero_grad_buffer()
    opt.zero_grad()
    batch = random_batch(cfg.vocab, 2, 0)
    get_forward_backward_func()(forward_step_func=partial(_forward_step, LMObjective()), data_iterator=iter([batch]), model=ddp,
                                num_microbatches=1, seq_length=batch.tokens.shape[1], micro_batch_size=2)
    opt.step()


def _check_upstream_and_fixes(root: str) -> dict:
    import torch
    from megatron.core import dist_checkpointing

    from ualm_nemo.compat import mcore_patches

    found = {}
    cfg, model, ddp, opt = _optimizer(1)
    try:  # 1. a fresh optimizer cannot produce its state dict (the state a resume loads into)
        opt.sharded_state_dict(model.sharded_state_dict(), is_loading=True,
                               metadata={"distrib_optim_sharding_type": "fully_reshardable"})
        found["fresh_state_upstream_fails"] = False
    except AssertionError:
        found["fresh_state_upstream_fails"] = True
    _step(cfg, ddp, opt)
    meta = {"distrib_optim_sharding_type": "fully_reshardable"}
    sd = {"model": model.sharded_state_dict(prefix="")}
    sd["optimizer"] = opt.sharded_state_dict(sd["model"], is_loading=False, metadata=meta)
    dist_checkpointing.save(sd, root)

    cfg, model, ddp, opt = _optimizer(2)
    _step(cfg, ddp, opt)  # work around #1 without the fix, to reach the load
    sd = {"model": model.sharded_state_dict(prefix="")}
    sd["optimizer"] = opt.sharded_state_dict(sd["model"], is_loading=True, metadata=meta)
    state = dist_checkpointing.load(sd, root)
    try:  # 2. loading per-parameter states without 'step' raises KeyError
        with torch.no_grad():
            opt.load_state_dict(state["optimizer"])
        found["fresh_step_upstream_fails"] = False
    except KeyError:
        found["fresh_step_upstream_fails"] = True

    mcore_patches.apply()
    cfg, model, ddp, opt = _optimizer(2)
    sd = {"model": model.sharded_state_dict(prefix="")}
    sd["optimizer"] = opt.sharded_state_dict(sd["model"], is_loading=True, metadata=meta)  # fixed: no assert
    state = dist_checkpointing.load(sd, root)
    with torch.no_grad():
        opt.load_state_dict(state["optimizer"])  # fixed: no KeyError
    inner = opt.chained_optimizers[0].optimizer if hasattr(opt, "chained_optimizers") else opt.optimizer
    steps = [s["step"] for s in inner.state.values()]
    found["distinct_step_tensors"] = len({id(s) for s in steps})
    found["num_params"] = len(steps)
    found["step_values"] = sorted({float(s) for s in steps})
    return found


def _shared_step_upstream() -> bool:
    """3. Without the fix, load_state_dict leaves one `step` tensor shared by every parameter."""
    import tempfile

    import torch
    from megatron.core import dist_checkpointing

    with tempfile.TemporaryDirectory() as root:
        cfg, model, ddp, opt = _optimizer(1)
        _step(cfg, ddp, opt)
        meta = {"distrib_optim_sharding_type": "fully_reshardable"}
        sd = {"model": model.sharded_state_dict(prefix="")}
        sd["optimizer"] = opt.sharded_state_dict(sd["model"], is_loading=False, metadata=meta)
        dist_checkpointing.save(sd, root)
        from ualm_nemo.compat import mcore_patches

        mcore_patches.apply(("fresh_step", "fresh_state"))  # everything but the fix under test
        cfg, model, ddp, opt = _optimizer(2)
        sd = {"model": model.sharded_state_dict(prefix="")}
        sd["optimizer"] = opt.sharded_state_dict(sd["model"], is_loading=True, metadata=meta)
        with torch.no_grad():
            opt.load_state_dict(dist_checkpointing.load(sd, root)["optimizer"])
        inner = opt.chained_optimizers[0].optimizer if hasattr(opt, "chained_optimizers") else opt.optimizer
        return len({id(s["step"]) for s in inner.state.values()}) == 1 < len(inner.state)


def test_upstream_failures_still_exist_and_fixes_work(tmp_path):
    found = run_distributed(1, _check_upstream_and_fixes, str(tmp_path))[0]
    assert found["fresh_state_upstream_fails"], "megatron-core fixed fresh-optimizer state_dict: drop fresh_state"
    assert found["fresh_step_upstream_fails"], "megatron-core fixed the missing 'step' KeyError: drop fresh_step"
    assert found["distinct_step_tensors"] == found["num_params"] > 1  # shared_step fix: one tensor per param
    assert found["step_values"] == [1.0]


def test_shared_step_upstream_still_shares():
    assert run_distributed(1, _shared_step_upstream)[0], "megatron-core no longer shares 'step': drop shared_step"


_TP_ATTRS = ("tensor_model_parallel", "partition_dim", "partition_stride")


def _tp_attributes() -> dict:
    """Every parameter's TP attributes at TP2: megatron built without initialisation, ours fixed, and initialised."""
    from dataclasses import replace

    from ualm_nemo.distributed.parallel import init_model_parallel
    from ualm_nemo.model.builder import build_model, layer_spec, transformer_config
    from ualm_nemo.model.config import BACKBONES, AudioInputConfig, UALMConfig
    from ualm_nemo.model.ualm import UALMLanguageModel

    cfg = UALMConfig(backbone=BACKBONES["tiny"], audio_in=AudioInputConfig(random_encoder=True))
    cfg = replace(cfg, audio_out=replace(cfg.audio_out, head="per_codebook")).with_parallel(
        tensor_model_parallel_size=2)
    init_model_parallel(cfg.parallel, seed=0)

    def attrs(model):
        return {n: tuple(getattr(p, a, None) for a in _TP_ATTRS) for n, p in model.named_parameters()}

    raw = UALMLanguageModel(transformer_config(cfg, False), cfg, layer_spec(cfg))  # what megatron alone gives
    return {"upstream": attrs(raw), "fixed": attrs(build_model(cfg, initialize=False)),
            "initialised": attrs(build_model(cfg))}


def test_uninitialised_build_has_the_tp_attributes_of_an_initialised_one():
    got = run_distributed(2, _tp_attributes)[1]  # TP rank 1: where a missing attribute changes the grad norm
    assert got["fixed"] == got["initialised"]
    assert sum(a[0] is True for a in got["initialised"].values()) > 10
    missing = [n for n, a in got["upstream"].items() if a != got["initialised"][n]]
    assert missing, "megatron-core now sets TP attributes without initialisation: drop set_missing_tp_attributes"


def _save_and_list_children(root: str, fixes: tuple[str, ...]) -> dict:
    import os

    import psutil
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    from ualm_nemo.compat import mcore_patches

    mcore_patches.apply(fixes)
    forks = []
    os.register_at_fork(after_in_parent=lambda: forks.append(1))  # multiprocessing's fork context forks here
    state = {"w": ShardedTensor.from_rank_offsets("w", torch.arange(8.0)),
             "v": ShardedTensor.from_rank_offsets("v", torch.arange(5, dtype=torch.int64))}
    dist_checkpointing.save(state, root)
    forked = len(forks)
    loaded = dist_checkpointing.load({"w": ShardedTensor.from_rank_offsets("w", torch.zeros(8)),
                                      "v": ShardedTensor.from_rank_offsets("v", torch.zeros(5, dtype=torch.int64))},
                                     root)
    # the results still reach the writer's finalisation, and every bucket's file is read back
    assert torch.equal(loaded["w"], torch.arange(8.0)) and torch.equal(loaded["v"], torch.arange(5))
    return {"children": [" ".join(p.cmdline())[:80] for p in psutil.Process().children(recursive=True)],
            "forks": forked, "files": sorted(p.name for p in Path(root).glob("*.distcp"))}


def test_a_save_starts_no_process_that_could_outlive_the_trainer(tmp_path):
    """Upstream, the first save starts a spawn-context Manager server, and every save forks a writer per file
    bucket; both survived kill -9 of training (issue 13: the forked writer hangs forever in task_done). With the
    fixes a save starts no process at all, and writes the same files."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    upstream = run_distributed(1, _save_and_list_children, str(tmp_path / "a"), ())[0]
    assert any("multiprocessing" in c or "spawn" in c for c in upstream["children"]), upstream  # else drop fix 4
    assert upstream["forks"] >= 2, upstream  # one writer per bucket (thread_count=2); else drop fix 5
    fixed = run_distributed(1, _save_and_list_children, str(tmp_path / "b"),
                            ("in_process_results", "in_process_writers"))[0]
    assert fixed["children"] == [] and fixed["forks"] == 0, fixed
    assert fixed["files"] == upstream["files"] and len(fixed["files"]) == 2, (fixed, upstream)


def _single_rank_collectives() -> dict:
    """Two steps at DP1 with upstream's collectives, then with single_rank_collectives: calls and weights."""
    import torch
    from megatron.core.distributed import param_and_grad_buffer as buffers

    from ualm_nemo.compat import mcore_patches

    calls = []

    def counting(name, collective):
        def call(*args, **kwargs):
            calls.append(name)
            return collective(*args, **kwargs)
        return call

    buffers.dist_all_gather_func = counting("all_gather", buffers.dist_all_gather_func)
    buffers.dist_reduce_scatter_func = counting("reduce_scatter", buffers.dist_reduce_scatter_func)
    out = {}
    for patched in (False, True):
        if patched:
            mcore_patches.apply(("single_rank_collectives",))
        calls.clear()
        cfg, model, ddp, opt = _optimizer(1)
        for _ in range(2):
            _step(cfg, ddp, opt)
        out[patched] = {"calls": sorted(set(calls)),
                        "weights": {n: p.detach().clone() for n, p in model.named_parameters()}}
    out["moved"] = any(not torch.equal(w, out[True]["weights"][n]) for n, w in _optimizer(1)[1].named_parameters())
    return out


def test_one_rank_skips_the_optimizer_collectives_with_the_same_weights():
    out = run_distributed(1, _single_rank_collectives)[0]
    assert out[False]["calls"] == ["all_gather", "reduce_scatter"], "upstream skips them itself now: drop the patch"
    assert out[True]["calls"] == []
    assert out["moved"]  # the steps changed the weights
    for name, weight in out[False]["weights"].items():
        assert torch.equal(out[True]["weights"][name], weight), name
