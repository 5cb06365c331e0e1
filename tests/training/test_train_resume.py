"""End to end through the NeMo model class, the Lightning Trainer and the Megatron strategy (real processes)."""

from __future__ import annotations

import logging

import pytest
import torch

from ualm_nemo.testing.dist import run_distributed

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]


def _config(output_dir: str, max_steps: int, tp: int = 1, lr: float = 2e-3, stop_at: int | None = None,
            parallel: dict | None = None) -> dict:
    return {"model": {"backbone": "tiny", "audio_in": {"random_encoder": True},
                      "parallel": {"tensor_model_parallel_size": tp, **(parallel or {})}},
            "optim": {"lr": lr, "min_lr": lr / 10, "warmup_steps": 2, "weight_decay": 0.01},
            "train": {"max_steps": max_steps, "global_batch_size": 4, "micro_batch_size": 2,
                      "checkpoint_every_n_steps": 4, "log_every_n_steps": 1, "stop_at_step": stop_at},
            "data": {"synthesize": True, "synthetic_samples_per_task": 8},
            "output_dir": output_dir}


def _train(output_dir: str, max_steps: int, tp: int = 1, lr: float = 2e-3, stop_at: int | None = None,
           init_from: str | None = None, parallel: dict | None = None) -> dict:
    from ualm_nemo.training.train import train

    cfg = _config(output_dir, max_steps, tp, lr, stop_at, parallel)
    cfg["train"]["init_from"] = init_from
    engine_log = _EngineLog()
    model = train(cfg)
    logging.getLogger("ualm_nemo.training.engine").removeHandler(engine_log)
    return {"history": model.loss_history, "step": model.engine.step, "consumed": model.trained_samples,
            "rejects": len(model.rejects), "chunks": len(model.engine.chunks), "rng": torch.get_rng_state(),
            "engine_log": engine_log.lines}


class _EngineLog(logging.Handler):
    """The engine's INFO lines of one run (what a user reads in the job log)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        logger = logging.getLogger("ualm_nemo.training.engine")
        logger.setLevel(logging.INFO)
        logger.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_interleaved_pipeline_run_resumes_at_pp1(tmp_path):
    """Through the NeMo model and Lightning at PP2 x VPP2 (two chunks per rank): 4 steps straight == a job ending at
    step 2 + a job resuming its checkpoint at PP1 (one process), the same losses to fp32 rounding."""
    vpp = {"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2}
    straight = run_distributed(2, _train, str(tmp_path / "straight"), 4, 1, 2e-3, None, None, vpp)[0]
    first = run_distributed(2, _train, str(tmp_path / "resumed"), 4, 1, 2e-3, 2, None, vpp)[0]
    second = run_distributed(1, _train, str(tmp_path / "resumed"), 4)[0]
    assert straight["chunks"] == 2 and second["chunks"] == 1
    assert [s for s, _ in first["history"] + second["history"]] == [1, 2, 3, 4]
    resumed = [loss for _, loss in first["history"] + second["history"]]
    assert resumed == pytest.approx([loss for _, loss in straight["history"]], rel=1e-5)


def test_training_lowers_the_loss(tmp_path):
    out = run_distributed(1, _train, str(tmp_path / "run"), 40, 1, 5e-3)[0]
    losses = [loss for _, loss in out["history"]]
    assert out["step"] == 40 and out["rejects"] == 0
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 1.0, f"loss did not drop: first 5 steps {first:.3f}, last 5 {last:.3f}"


def test_interrupted_run_resumes_exactly(tmp_path):
    """TP2 over 2 processes: 6 steps straight == a job that ends at step 3 + a new job resuming to 6 (bit for bit).

    The first job ends between periodic checkpoints (every 4 steps), like a job reaching its time limit.
    """
    straight = run_distributed(2, _train, str(tmp_path / "straight"), 6, 2)[0]
    first = run_distributed(2, _train, str(tmp_path / "resumed"), 6, 2, 2e-3, 3)[0]
    second = run_distributed(2, _train, str(tmp_path / "resumed"), 6, 2)[0]
    assert [s for s, _ in first["history"]] == [1, 2, 3]
    assert [s for s, _ in second["history"]] == [4, 5, 6]  # the step count continues
    assert first["history"] + second["history"] == straight["history"]  # same losses, same data order
    assert second["consumed"] == straight["consumed"] == 6 * 4
    # the random stream continues too (a data loader's iterator once drew its seed from the global RNG after the
    # restore: losses stayed equal, the stream did not)
    assert torch.equal(second["rng"], straight["rng"])
    # TensorBoard: one value per step across the two jobs, each the loss of that step (issue 13: after a resume
    # the series used to run one step early, step k holding two values)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "resumed" / "tensorboard")).Reload().Scalars("train/loss")
    assert [e.step for e in events] == [1, 2, 3, 4, 5, 6]
    assert [e.value for e in events] == pytest.approx([loss for _, loss in straight["history"]], rel=1e-6)


def test_new_run_starts_from_given_weights(tmp_path):
    """train.init_from: a new run (step 0, fresh optimizer) starts from another run's (or an import's) weights."""
    trained = run_distributed(1, _train, str(tmp_path / "a"), 20, 1, 5e-3)[0]
    fresh = run_distributed(1, _train, str(tmp_path / "fresh"), 1)[0]
    started = run_distributed(1, _train, str(tmp_path / "b"), 1, 1, 2e-3, None, str(tmp_path / "a" / "checkpoints"))[0]
    assert [s for s, _ in started["history"]] == [1]  # a new run: its own step count
    loaded = [line for line in started["engine_log"] if line.startswith("train.init_from: loaded")]
    assert len(loaded) == 1 and "/a/checkpoints/iter_0000020 (step 20 of that run)" in loaded[0], started["engine_log"]
    assert not any("train.init_from" in line for line in trained["engine_log"])
    assert started["history"][0][1] < fresh["history"][0][1] - 1.0  # same first batch, trained weights
    assert abs(started["history"][0][1] - trained["history"][-1][1]) < 1.5


def test_a_damaged_latest_checkpoint_resumes_from_the_previous_one(tmp_path):
    """Issue 13, class 6, through train(): the latest checkpoint (step 8) is truncated, so the rerun resumes from
    the previous complete one (step 4) and retrains steps 5..8 exactly as the first run did; nothing is lost."""
    import os

    out = tmp_path / "run"
    first = run_distributed(1, _train, str(out), 8)[0]
    assert sorted(p.name for p in (out / "checkpoints").glob("iter_*")) == ["iter_0000004", "iter_0000008"]
    shard = next((out / "checkpoints" / "iter_0000008").glob("*.distcp"))
    os.truncate(shard, shard.stat().st_size // 2)
    again = run_distributed(1, _train, str(out), 8)[0]
    assert [s for s, _ in again["history"]] == [5, 6, 7, 8]
    assert again["history"] == first["history"][4:]  # the same losses: weights, optimizer and data order restored
    assert again["consumed"] == first["consumed"]
