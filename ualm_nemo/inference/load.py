"""Load a training checkpoint into a single-process (TP1/PP1) model for generation and evaluation.

The model config is read from the checkpoint itself (``ualm_config`` in ualm_common.pt), so a checkpoint
folder is all a user needs; Megatron's resharding load turns any training layout into TP1/PP1.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ualm_nemo.distributed import checkpoint
from ualm_nemo.distributed.parallel import init_distributed, init_model_parallel
from ualm_nemo.model.builder import build_model
from ualm_nemo.model.config import UALMConfig


def resolve_checkpoint(path: str | Path) -> Path:
    """A run's checkpoint folder (its ``latest``) or one ``iter_*`` folder -> the iter folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    latest = checkpoint.find_latest(path)
    resolved = latest or path
    if not (resolved / "ualm_common.pt").exists():
        raise FileNotFoundError(f"{path} holds no complete ualm_nemo checkpoint (no 'latest', no ualm_common.pt)")
    return resolved


def checkpoint_model_config(path: Path) -> UALMConfig:
    from ualm_nemo.training.run_config import model_config_from_dict

    common = torch.load(path / "ualm_common.pt", weights_only=False)
    if "ualm_config" not in common:
        raise ValueError(f"{path} was written without its model config; pass the config explicitly")
    return model_config_from_dict(common["ualm_config"])


def load_for_inference(path: str | Path, seed: int = 0):
    """-> (UALMLanguageModel at TP1/PP1 in eval mode, its UALMConfig, the checkpoint step)."""
    resolved = resolve_checkpoint(path)
    cfg = checkpoint_model_config(resolved)
    cfg = replace(cfg, parallel=replace(cfg.parallel, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                                        sequence_parallel=False,
                                        transformer_impl="local" if not torch.cuda.is_available()
                                        else cfg.parallel.transformer_impl))
    init_distributed()
    init_model_parallel(cfg.parallel, seed)
    model = build_model(cfg)
    state = checkpoint.load_checkpoint(resolved, [model], optimizer=None, restore_rng=False)
    return model.eval(), cfg, int(state["step"])
