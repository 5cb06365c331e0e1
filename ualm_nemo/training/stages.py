"""Training stages as parameter-freezing policies (what trains is decided here, nowhere else).

* ``align``: modality alignment; backbone (text rows, decoder) frozen; the adapter, the audio embedding rows,
  the audio head and the stream embeddings / codebook heads train (paper: 1.8k steps).
* ``pretrain`` / ``sft`` / ``dpo``: everything but the frozen audio encoder (the codec is never part of the model).
"""

from __future__ import annotations

import torch

from ualm_nemo.model.config import ConfigError

_ALIGN_TRAINABLE = ("embedding.audio.", "heads.audio_head.", "heads.stream_embedding", "heads.codebook_heads",
                    "audio_input.adapter.")
_ALWAYS_FROZEN = ("audio_input.encoder.",)
STAGES = ("align", "pretrain", "sft", "dpo")


def is_trainable(stage: str, name: str) -> bool:
    if stage not in STAGES:
        raise ConfigError(f"train.stage={stage!r}: choose one of {STAGES}")
    if name.startswith(_ALWAYS_FROZEN):
        return False
    if stage == "align":
        return name.startswith(_ALIGN_TRAINABLE)
    return True


def apply_stage(model: torch.nn.Module, stage: str) -> tuple[int, int]:
    """Set requires_grad per the stage. Returns (trainable, total) parameter counts of this rank."""
    trainable = total = 0
    for name, param in model.named_parameters():
        param.requires_grad_(is_trainable(stage, name))
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return trainable, total
