"""Training from Lhotse Shar shards (token-budget, packed micro-batches) resumes at exactly the next sample."""

from __future__ import annotations

import pytest

from ualm_nemo.testing.dist import run_distributed

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]


def _train(output_dir: str, shar_dirs: dict, stop_at: int | None) -> dict:
    from ualm_nemo.training.train import train

    sources = [{"name": task, "shar_dir": path, "weight": 2.0 if task == "tta" else 1.0}
               for task, path in shar_dirs.items()]
    model = train({
        "model": {"backbone": "tiny", "audio_in": {"random_encoder": True}},
        "optim": {"lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 1},
        "train": {"max_steps": 6, "global_batch_size": 4, "micro_batch_size": 1, "checkpoint_every_n_steps": 4,
                  "stop_at_step": stop_at},
        "data": {"tokenizer": "byte", "shar": {"sources": sources, "seed": 5, "window_size": 8, "max_tokens": 512,
                                               "seq_len": 256, "pack": True}},
        "output_dir": output_dir})
    return {"history": model.loss_history, "consumed": model.trained_samples}


def test_shar_training_resumes_at_the_next_sample(tmp_path, demo_shar):
    """DP2 (2 processes): a job ended at step 3 + a resumed job == an uninterrupted run, bit for bit."""
    straight = run_distributed(2, _train, str(tmp_path / "straight"), demo_shar, None)[0]
    first = run_distributed(2, _train, str(tmp_path / "resumed"), demo_shar, 3)[0]
    second = run_distributed(2, _train, str(tmp_path / "resumed"), demo_shar, None)[0]
    assert [s for s, _ in second["history"]] == [4, 5, 6]
    assert first["history"] + second["history"] == straight["history"]
    assert second["consumed"] == straight["consumed"] > 0
