"""Training stages as parameter-freezing policies (what trains is decided here, nowhere else).

* ``align``: modality alignment; the backbone (decoder, text rows of the embedding and the text head) frozen; the
  adapter, the audio embedding rows, the audio head, the stream embeddings / codebook heads and the UALM special
  rows (``<|audio_start|>``, ``<|audio_end|>``, ``<|audio_in|>``, ``<|pad|>``) of the text embedding and text head
  train (paper: 1.8k steps). The specials are new to the Qwen vocabulary: frozen, they would keep their initial
  value through the whole stage.
* ``pretrain`` / ``sft`` / ``dpo``: everything but the frozen audio encoder (the codec is never part of the model).

A partly frozen table keeps ``requires_grad`` and gets a gradient hook that zeroes its frozen rows before the
gradient reaches Megatron's buffers; it is marked ``partially_frozen`` so the optimizer gives it no weight decay
(decoupled decay would otherwise shrink the frozen rows). With zero gradients Adam's moments stay zero and its
update is exactly zero: the frozen rows stay bit-identical (tested in tests/training/test_stages.py).
"""

from __future__ import annotations

import torch

from ualm_nemo.distributed.optim import PARTIALLY_FROZEN
from ualm_nemo.model.config import ConfigError
from ualm_nemo.model.vocab import SPECIALS

_ALIGN_TRAINABLE = ("embedding.audio.", "heads.audio_head.", "heads.stream_embedding", "heads.codebook_heads",
                    "audio_input.adapter.")
_ALIGN_SPECIAL_ROWS = ("embedding.text.weight", "heads.text_head.weight")  # tables whose special rows train
_ALWAYS_FROZEN = ("audio_input.encoder.",)
STAGES = ("align", "pretrain", "sft", "dpo")


def is_trainable(stage: str, name: str) -> bool:
    """Whether every element of parameter ``name`` trains (see ``special_rows_only`` for the partly frozen)."""
    if stage not in STAGES:
        raise ConfigError(f"train.stage={stage!r}: choose one of {STAGES}")
    if name.startswith(_ALWAYS_FROZEN):
        return False
    if stage == "align":
        return name.startswith(_ALIGN_TRAINABLE)
    return True


def special_rows_only(stage: str, name: str) -> bool:
    """Whether only the UALM special rows of table ``name`` train in ``stage``."""
    return stage == "align" and name in _ALIGN_SPECIAL_ROWS


def _local_first_row(model: torch.nn.Module, name: str) -> int:
    """Global row index of this TP rank's first row of a vocab-parallel table."""
    if name == "embedding.text.weight":
        return int(model.embedding.text.vocab_start_index)
    return int(model.heads.tp_rank * model.heads.text_part)


def special_row_mask(model: torch.nn.Module, name: str, param: torch.Tensor) -> torch.Tensor:
    """[local rows, 1] bool: True on this rank's rows of the UALM specials (ids text_vocab_size + k)."""
    first_special = model.ualm.backbone.text_vocab_size
    rows = torch.arange(param.shape[0], device=param.device) + _local_first_row(model, name)
    return ((rows >= first_special) & (rows < first_special + len(SPECIALS))).unsqueeze(-1)


def apply_stage(model: torch.nn.Module, stage: str) -> tuple[int, int]:
    """Set requires_grad (and the special-row gradient masks) per the stage. Returns (trainable, total)
    parameter counts of this rank, the special rows of a partly frozen table counted as trainable."""
    trainable = total = 0
    for name, param in model.named_parameters():
        total += param.numel()
        if special_rows_only(stage, name):
            mask = special_row_mask(model, name, param)
            param.requires_grad_(True)
            setattr(param, PARTIALLY_FROZEN, True)
            param.register_hook(lambda grad, keep=mask: torch.where(keep, grad, torch.zeros_like(grad)))
            trainable += int(mask.sum()) * param.shape[1]
            continue
        param.requires_grad_(is_trainable(stage, name))
        trainable += param.numel() if param.requires_grad else 0
    return trainable, total
