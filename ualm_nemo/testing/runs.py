"""A tiny pre-trained checkpoint for tests that start post-training from one (one run per test session)."""

from __future__ import annotations

OPTIM = {"lr": 2e-3, "min_lr": 2e-3, "warmup_steps": 0, "weight_decay": 0.0}


def pretrain_tiny(output_dir: str, steps: int = 2) -> str:
    """``steps`` pre-training steps of the tiny model on the synthetic demo set (run it in a process of its own:
    ``run_distributed(1, pretrain_tiny, path)``) -> its checkpoint folder; the run's codec is ``output_dir/codec``."""
    from ualm_nemo.training.train import train

    train({"model": {"backbone": "tiny"}, "optim": dict(OPTIM),
           "train": {"stage": "pretrain", "max_steps": steps, "global_batch_size": 2, "micro_batch_size": 1,
                     "checkpoint_every_n_steps": 100, "log_every_n_steps": 1},
           "data": {"synthesize": True, "synthetic_samples_per_task": 4}, "output_dir": output_dir})
    return f"{output_dir}/checkpoints"
