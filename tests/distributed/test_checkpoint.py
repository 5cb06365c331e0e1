"""Distributed checkpoints: resharding on load, bit-exact resume with optimizer state, atomic saves."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ualm_nemo.testing.dist import run_distributed

pytestmark = pytest.mark.timeout(600)
STEPS = [(0, 1), (2, 3), (4, 5), (6, 7)]  # micro-batch seeds of each step's global batch


def _engine(tp: int, pp: int, seed: int = 5, vpp: int | None = None):
    from ualm_nemo.distributed.optim import OptimConfig
    from ualm_nemo.distributed.parallel import init_model_parallel
    from ualm_nemo.model.config import BACKBONES, AudioInputConfig, UALMConfig
    from ualm_nemo.training.engine import MegatronEngine

    cfg = UALMConfig(backbone=BACKBONES["tiny"], audio_in=AudioInputConfig(enabled=False)).with_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp)
    init_model_parallel(cfg.parallel, seed=seed)
    return MegatronEngine(cfg, OptimConfig(lr=3e-3, warmup_steps=2, weight_decay=0.1), max_steps=len(STEPS))


def _steps(engine, which) -> list[float]:
    from megatron.core import parallel_state as ps

    from ualm_nemo.testing.batches import random_batch

    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    return [engine.train_step([random_batch(engine.cfg.vocab, 2, s) for s in STEPS[i][rank::dp]]).loss
            for i in which]


def _train_save(root: str, tp: int, pp: int, save_after: int, vpp: int | None = None) -> dict:
    engine = _engine(tp, pp, vpp=vpp)
    losses = _steps(engine, range(save_after))
    engine.save(root, extra={"note": "test"})
    eval_batch = _eval_batches(engine)
    return {"losses": losses, "eval": engine.eval_loss(eval_batch), "continued": _steps(engine, range(save_after, len(STEPS)))}


def _eval_batches(engine):
    from megatron.core import parallel_state as ps

    from ualm_nemo.testing.batches import random_batch

    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    return [random_batch(engine.cfg.vocab, 2, s) for s in (20, 21)[rank::dp]]


def _resume(root: str, tp: int, pp: int, first: int, vpp: int | None = None) -> dict:
    from ualm_nemo.distributed.checkpoint import find_latest

    engine = _engine(tp, pp, seed=77, vpp=vpp)  # different init: everything must come from the checkpoint
    state = engine.load(str(find_latest(root)))
    assert state["note"] == "test" and engine.step == first
    return {"eval": engine.eval_loss(_eval_batches(engine)), "continued": _steps(engine, range(first, len(STEPS)))}


def test_resume_is_bit_exact_same_layout(tmp_path):
    """Interrupted at step 2 and resumed in new processes == uninterrupted, bit for bit (TP2 with dist-opt)."""
    ref = run_distributed(2, _train_save, str(tmp_path), 2, 1, 2)[0]
    got = run_distributed(2, _resume, str(tmp_path), 2, 1, 2)[0]
    assert got["eval"] == ref["eval"]
    assert got["continued"] == ref["continued"]
    assert len(ref["continued"]) == 2 and ref["continued"][-1] < ref["losses"][0]


@pytest.mark.parametrize("save_layout,load_layout", [((2, 1, 2, None), (1, 1, 1, None)),
                                                     ((1, 1, 2, None), (1, 2, 2, None)),
                                                     ((1, 2, 2, 2), (1, 1, 1, None))],
                         ids=["tp2->tp1", "dp2->pp2", "pp2-vpp2->pp1"])
def test_reshard_on_load(tmp_path, save_layout, load_layout):
    """Model and (fully reshardable) optimizer state saved at one layout continue training at another; (TP, PP,
    world, VPP): virtual pipeline chunks (global layers 0, 2 on rank 0; 1, 3 on rank 1) load into one stage."""
    stp, spp, sworld, svpp = save_layout
    ltp, lpp, lworld, lvpp = load_layout
    ref = run_distributed(sworld, _train_save, str(tmp_path), stp, spp, 2, svpp)[0]
    got = run_distributed(lworld, _resume, str(tmp_path), ltp, lpp, 2, lvpp)[0]
    assert got["eval"] == pytest.approx(ref["eval"], rel=1e-6)
    assert got["continued"] == pytest.approx(ref["continued"], rel=1e-5)


def _save_then_crash(root: str) -> None:
    """Save step 1 fully, then die inside the save of step 2 (after the shards, before the rename)."""
    import ualm_nemo.distributed.checkpoint as ckpt

    engine = _engine(1, 1)
    _steps(engine, [0])
    engine.save(root, extra={"note": "test"})
    _steps(engine, [1])
    real_replace = os.replace

    def crash(src, dst):
        if str(src).endswith(".tmp") and "iter_" in str(src):
            os._exit(17)  # a SIGKILL-like death: no cleanup runs
        return real_replace(src, dst)

    ckpt.os.replace = crash
    engine.save(root)


def test_killed_save_leaves_previous_checkpoint(tmp_path):
    with pytest.raises(RuntimeError):
        run_distributed(1, _save_then_crash, str(tmp_path))
    from ualm_nemo.distributed.checkpoint import find_latest

    assert find_latest(tmp_path) == Path(tmp_path) / "iter_0000001"
    assert (Path(tmp_path) / "iter_0000002.tmp").exists()  # the half-written save is visibly incomplete
    got = run_distributed(1, _resume, str(tmp_path), 1, 1, 1)[0]
    assert len(got["continued"]) == len(STEPS) - 1
