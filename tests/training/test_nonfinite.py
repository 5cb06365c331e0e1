"""Non-finite losses through the NeMo model class and the Lightning loop: a NaN step is skipped (weights and
optimizer untouched), counted, and training goes on; N in a row stop the run naming train.max_consecutive_nonfinite.
The NaN enters the way bad data would: through the batch's loss weights."""

from __future__ import annotations

import math

import pytest
import torch

from ualm_nemo.testing.dist import run_distributed

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]


def _config(output_dir: str, max_steps: int, max_nonfinite: int) -> dict:
    return {"model": {"backbone": "tiny", "audio_in": {"random_encoder": True}},
            "optim": {"lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 1},
            "train": {"max_steps": max_steps, "global_batch_size": 4, "micro_batch_size": 2,
                      "checkpoint_every_n_steps": 1000, "log_every_n_steps": 1,
                      "max_consecutive_nonfinite": max_nonfinite},
            "data": {"synthesize": True, "synthetic_samples_per_task": 4},
            "output_dir": output_dir}


def _train_with_nan(output_dir: str, max_steps: int, max_nonfinite: int, nan_calls: list[int]) -> dict:
    """Train; the engine's train_step calls numbered in ``nan_calls`` (1-based) see NaN loss weights."""
    from ualm_nemo.training import engine as engine_mod
    from ualm_nemo.training.nemo_model import NonFiniteLossError
    from ualm_nemo.training.train import train

    original = engine_mod.MegatronEngine.train_step
    calls, unchanged = [0], []

    def train_step(self, microbatches):
        calls[0] += 1
        if calls[0] not in nan_calls:
            return original(self, microbatches)
        for mb in microbatches:
            mb.loss_weights = torch.full_like(mb.loss_weights, float("nan"))
        before = [p.detach().clone() for chunk in self.chunks for p in chunk.parameters()]
        result = original(self, microbatches)
        after = [p.detach() for chunk in self.chunks for p in chunk.parameters()]
        unchanged.append(all(torch.equal(a, b) for a, b in zip(before, after)))
        return result

    engine_mod.MegatronEngine.train_step = train_step
    try:
        model = train(_config(output_dir, max_steps, max_nonfinite))
        return {"history": model.loss_history, "step": model.engine.step, "skipped": model.skipped_steps,
                "unchanged": unchanged, "error": None}
    except NonFiniteLossError as err:
        return {"error": str(err), "unchanged": unchanged, "calls": calls[0]}
    finally:
        engine_mod.MegatronEngine.train_step = original


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(tmp_path):
    out = run_distributed(1, _train_with_nan, str(tmp_path / "skip"), 6, 3, [2, 3])[0]
    assert out["error"] is None
    losses = [loss for _, loss in out["history"]]
    assert [math.isfinite(x) for x in losses] == [True, False, False, True, True, True]  # training went on
    assert out["skipped"] == 2 and out["unchanged"] == [True, True]  # skipped steps leave the weights alone
    assert out["step"] == 6  # iterations count skipped updates too (engine.step == trainer.global_step)

    out = run_distributed(1, _train_with_nan, str(tmp_path / "stop"), 8, 3, [2, 3, 4, 5])[0]
    assert out["calls"] == 4  # stopped at the third NaN in a row
    assert out["error"].startswith("3 non-finite losses in a row") and "train.max_consecutive_nonfinite" in out["error"]
