"""Asynchronous checkpoint saves on real gloo processes (TP2): training goes on while the files are written,
the next save waits for the previous one, ``latest`` moves only once every rank is done, and a run resumed from
an asynchronous checkpoint continues bit for bit like one resumed from a synchronous one.

The writer is held, not slowed: megatron's bucket writer (``write_preloaded_data``, run by our writer thread)
waits for a release file, so "training went on during the write" does not depend on the machine's speed.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from ualm_nemo.testing.dist import run_distributed

pytestmark = pytest.mark.timeout(600)
STEPS = [(0, 1), (2, 3), (4, 5), (6, 7)]  # micro-batch seeds of each step's global batch


def _engine(seed: int = 5):
    from ualm_nemo.distributed.optim import OptimConfig
    from ualm_nemo.distributed.parallel import init_model_parallel
    from ualm_nemo.model.config import BACKBONES, AudioInputConfig, UALMConfig
    from ualm_nemo.training.engine import MegatronEngine

    cfg = UALMConfig(backbone=BACKBONES["tiny"], audio_in=AudioInputConfig(enabled=False)).with_parallel(
        tensor_model_parallel_size=2)
    init_model_parallel(cfg.parallel, seed=seed)
    return MegatronEngine(cfg, OptimConfig(lr=3e-3, warmup_steps=2, weight_decay=0.1), max_steps=len(STEPS))


def _steps(engine, which) -> list[float]:
    from ualm_nemo.testing.batches import random_batch

    return [engine.train_step([random_batch(engine.cfg.vocab, 2, s) for s in STEPS[i]]).loss for i in which]


def _hold_writer(release: Path) -> list[float]:
    """Make every bucket write wait until ``release`` exists; returns the times the writes began."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    write, began = FileSystemWriterAsync.write_preloaded_data, []

    def held(*args, **kwargs):
        began.append(time.monotonic())
        while not release.exists():
            time.sleep(0.02)
        return write(*args, **kwargs)

    FileSystemWriterAsync.write_preloaded_data = staticmethod(held)  # before our in-thread writer binds it
    return began


def _latest(root: Path) -> str | None:
    return (root / "latest").read_text().strip() if (root / "latest").exists() else None


def _async_run(root: str, release: str) -> dict:
    root, release = Path(root), Path(release)
    _hold_writer(release)
    engine = _engine()
    losses = _steps(engine, [0, 1])
    engine.save(str(root), extra={"note": "test"}, async_save=True)
    stall = engine.saver.times.stall
    # training goes on while the writer of step 2 is held; nothing is published meanwhile
    continued = _steps(engine, [2, 3])
    assert engine.poll_save() is None and _latest(root) is None
    assert (root / "iter_0000002.tmp").is_dir() and not (root / "iter_0000002").exists()
    # the next save waits for the previous one to be complete (and published) before it starts
    threading.Timer(1.0, release.touch).start()
    begin = time.monotonic()
    engine.save(str(root), async_save=True)
    waited = time.monotonic() - begin
    latest_after_second_start = _latest(root)
    final = engine.finish_save()
    return {"losses": losses, "continued": continued, "stall": stall, "waited": waited,
            "latest_after_second_start": latest_after_second_start, "final": final.name, "latest": _latest(root)}


def _sync_run(root: str) -> dict:
    engine = _engine()
    losses = _steps(engine, [0, 1])
    engine.save(root, extra={"note": "test"})
    return {"losses": losses, "continued": _steps(engine, [2, 3])}


def _resume(iteration: str) -> list[float]:
    engine = _engine(seed=77)  # another init: everything must come from the checkpoint
    state = engine.load(iteration)
    assert state["note"] == "test" and engine.step == 2
    return _steps(engine, [2, 3])


def test_async_save_overlaps_training_and_resumes_bit_exact(tmp_path):
    got = run_distributed(2, _async_run, str(tmp_path / "async"), str(tmp_path / "release"))
    ref = run_distributed(2, _sync_run, str(tmp_path / "sync"))[0]
    for rank in (0, 1):
        r = got[rank]
        assert r["losses"] == ref["losses"] and r["continued"] == ref["continued"]  # saving changed nothing
        assert r["waited"] >= 0.9  # the second save started only once the first was written...
        assert r["latest_after_second_start"] == "iter_0000002"  # ...and published
        assert r["final"] == "iter_0000004" and r["latest"] == "iter_0000004"
    assert not list((tmp_path / "async").glob("*.tmp"))
    from_async = run_distributed(2, _resume, str(tmp_path / "async" / "iter_0000002"))[0]
    from_sync = run_distributed(2, _resume, str(tmp_path / "sync" / "iter_0000002"))[0]
    assert from_async == from_sync == ref["continued"]  # bit for bit


def _repeated_saves(root: str) -> dict:
    """Three asynchronous saves (the 3rd reuses megatron's cached plan and metadata) with training between."""
    engine = _engine()
    for step in range(3):
        _steps(engine, [step])
        engine.save(root, extra={"note": "test"}, async_save=True)
    engine.finish_save()
    return {"cached": engine.saver.strategy.validated_cache_reuse, "latest": _latest(Path(root))}


def _resume_at_3(root: str) -> list[float]:
    engine = _engine(seed=77)
    engine.load(str(Path(root) / "iter_0000003"))
    return _steps(engine, [3])


def _sync_3(root: str) -> list[float]:
    engine = _engine()
    _steps(engine, [0, 1, 2])
    engine.save(root, extra={"note": "test"})
    return _steps(engine, [3])


def test_cached_plan_saves_are_complete(tmp_path):
    """The save that reuses the cached plan and global metadata writes a checkpoint that resumes exactly."""
    got = run_distributed(2, _repeated_saves, str(tmp_path / "a"))[0]
    assert got["cached"] and got["latest"] == "iter_0000003"
    ref = run_distributed(2, _sync_3, str(tmp_path / "s"))[0]
    assert run_distributed(2, _resume_at_3, str(tmp_path / "a"))[0] == ref


def _dp2_engine():
    from ualm_nemo.distributed.optim import OptimConfig
    from ualm_nemo.distributed.parallel import init_model_parallel
    from ualm_nemo.model.config import BACKBONES, AudioInputConfig, UALMConfig
    from ualm_nemo.training.engine import MegatronEngine

    cfg = UALMConfig(backbone=BACKBONES["tiny"], audio_in=AudioInputConfig(enabled=False)).with_parallel(
        use_distributed_optimizer=True)
    init_model_parallel(cfg.parallel, seed=5)
    return MegatronEngine(cfg, OptimConfig(lr=3e-3, warmup_steps=2, weight_decay=0.1), max_steps=len(STEPS))


def _sync_and_async_at_step_2(root: str, release: str) -> int:
    """A synchronous and an asynchronous save of the same step; the async one's gather and write happen after
    the next steps trained (its gather is held until they are done)."""
    from ualm_nemo.distributed.deferred_optimizer_state import DeferredGather

    fill = DeferredGather.fill

    def held(self):
        while not Path(release).exists():
            time.sleep(0.02)
        fill(self)

    DeferredGather.fill = held
    engine = _dp2_engine()
    assert engine.optimizer.chained_optimizers[0].data_parallel_group_gloo.size() == 2  # the gather is real
    _steps(engine, [0, 1])
    engine.save(f"{root}/sync")
    engine.save(f"{root}/async", async_save=True)
    _steps(engine, [2, 3])
    assert engine.poll_save() is None  # still held: the steps ran before the gather
    Path(release).touch()
    engine.finish_save()
    return 0


def test_async_save_writes_the_files_of_a_sync_save_across_data_parallel_ranks(tmp_path):
    """DP2 with the distributed optimizer: the optimizer state gathered by the writer thread (from the shards
    copied at the step) is the state megatron gathers at the step, tensor for tensor."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    run_distributed(2, _sync_and_async_at_step_2, str(tmp_path), str(tmp_path / "release"))
    saved = {}
    for kind in ("sync", "async"):
        dcp_to_torch_save(tmp_path / kind / "iter_0000002", tmp_path / f"{kind}.pt")
        saved[kind] = torch.load(tmp_path / f"{kind}.pt", weights_only=False)
    tensors = [k for k, v in saved["sync"].items() if isinstance(v, torch.Tensor)]
    assert sum(k.startswith("optimizer.state.exp_avg_sq.") for k in tensors) >= 10
    assert saved["sync"].keys() == saved["async"].keys()
    assert [k for k in tensors if not torch.equal(saved["sync"][k], saved["async"][k])] == []
