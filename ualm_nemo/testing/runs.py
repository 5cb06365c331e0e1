"""Tiny training runs for the post-training tests: one run config shape, and a pre-trained checkpoint to start from."""

from __future__ import annotations

OPTIM = {"lr": 2e-3, "min_lr": 2e-3, "warmup_steps": 0, "weight_decay": 0.0}


def tiny_run(output_dir: str, stage: str, max_steps: int, init_from: str | None, data: dict,
             stop_at: int | None = None) -> dict:
    """A run config dict of the tiny model: 2 samples (DPO: pairs) per step in micro-batches of 1, logged each step,
    a constant learning rate (so a resumed run's schedule cannot hide a difference)."""
    return {"model": {"backbone": "tiny", "audio_in": {"random_encoder": True}}, "optim": dict(OPTIM),
            "train": {"stage": stage, "max_steps": max_steps, "global_batch_size": 2, "micro_batch_size": 1,
                      "checkpoint_every_n_steps": 100, "log_every_n_steps": 1, "init_from": init_from,
                      "stop_at_step": stop_at},
            "data": data, "output_dir": output_dir}


def pretrain_tiny(output_dir: str, steps: int = 2) -> str:
    """``steps`` pre-training steps on the synthetic demo set (run it in a process of its own:
    ``run_distributed(1, pretrain_tiny, path)``) -> its checkpoint folder; the run's codec is ``output_dir/codec``."""
    from ualm_nemo.training.train import train

    train(tiny_run(output_dir, "pretrain", steps, None, {"synthesize": True, "synthetic_samples_per_task": 4}))
    return f"{output_dir}/checkpoints"
