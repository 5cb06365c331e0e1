"""Load a training checkpoint into the Megatron model for decoding and evaluation (PP=1, any TP).

The model config is read from the checkpoint itself (``ualm_config`` in ualm_common.pt), so a checkpoint
folder is all a user needs; Megatron's resharding load turns any training layout into the decoding layout:
TP = ``tensor_parallel`` (the torch.distributed world, e.g. under torchrun), PP 1, no sequence parallelism,
the local layer spec (the decoding backend's attention takes an explicit padding mask; the weights are the
same for either spec).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ualm_nemo.distributed import checkpoint
from ualm_nemo.distributed.parallel import init_distributed, init_model_parallel
from ualm_nemo.model.builder import build_model


def load_for_inference(path: str | Path, seed: int = 0, tensor_parallel: int = 1):
    """-> (UALMLanguageModel at TP=tensor_parallel, PP1, in eval mode; its UALMConfig; the checkpoint step)."""
    resolved = checkpoint.resolve_checkpoint(path)
    cfg = checkpoint.stored_model_config(resolved)
    if cfg is None:
        raise ValueError(f"{resolved} was written without its model config; pass the config explicitly")
    cfg = cfg.without_training_features()
    cfg = replace(cfg, parallel=replace(cfg.parallel, tensor_model_parallel_size=tensor_parallel,
                                        pipeline_model_parallel_size=1, sequence_parallel=False,
                                        transformer_impl="local"))
    init_distributed()
    init_model_parallel(cfg.parallel, seed)
    model = build_model(cfg)
    state = checkpoint.load_checkpoint(resolved, [model], optimizer=None, restore_rng=False)
    return model.eval(), cfg, int(state["step"])
