"""An engine built without initialisation (a resume or train.init_from will fill every weight) never trains on
uninitialised memory: it refuses to step until a checkpoint load has happened."""

from __future__ import annotations

from ualm_nemo.testing.dist import run_distributed


def _guard(root: str) -> dict:
    from ualm_nemo.distributed.optim import OptimConfig
    from ualm_nemo.distributed.parallel import init_model_parallel
    from ualm_nemo.model.config import BACKBONES, AudioInputConfig, UALMConfig
    from ualm_nemo.testing.batches import random_batch
    from ualm_nemo.training.engine import MegatronEngine

    cfg = UALMConfig(backbone=BACKBONES["tiny"], audio_in=AudioInputConfig(enabled=False))
    optim = OptimConfig(lr=1e-3, warmup_steps=0)
    batch = random_batch(cfg.vocab, 2, 3)
    init_model_parallel(cfg.parallel, seed=0)
    trained = MegatronEngine(cfg, optim, max_steps=4)
    trained.train_step([batch])
    path = trained.save(root)
    fresh = MegatronEngine(cfg, optim, max_steps=4, initialize=False)
    try:
        fresh.train_step([batch])
        refused = "no error"
    except RuntimeError as err:
        refused = str(err)
    fresh.load(str(path))
    return {"refused": refused, "after_load": fresh.train_step([batch]).loss, "expected": trained.train_step([batch]).loss}


def test_uninitialised_engine_refuses_to_train_until_loaded(tmp_path):
    got = run_distributed(1, _guard, str(tmp_path))[0]
    assert "refusing to train on uninitialised memory" in got["refused"]
    assert got["after_load"] == got["expected"]  # loaded: the same step as the engine it was saved from
