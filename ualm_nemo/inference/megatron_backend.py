"""The Megatron model as a decoding backend: megatron-core's static KV cache through ``TransformerBlock``.

Works under tensor parallelism (each rank caches its own KV heads; logits are gathered by the heads, so every
TP rank sees the same logits and, with the same seeds, makes the same choices). PP=1 only: the decoding loop
needs the logits of every step on the rank that feeds the next position.

Left padding is handled as in ``backends``: each row's rotary positions start at its first real slot (the
rotary table is built per row for the whole cache length; megatron slices it at the cache offset), and padded
slots are masked out of attention (True = masked, megatron's convention).
"""

from __future__ import annotations

from typing import Sequence

import torch
from megatron.core import parallel_state
from megatron.core.inference.contexts import StaticInferenceContext

from ualm_nemo.model.attention_mask import packed_attention_mask
from ualm_nemo.inference.backends import FullForward, Logits, batch_features, left_pad, positions


def check_decodable(model) -> None:
    """Refuse layouts the decoding loop cannot drive, with the reason."""
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        raise ValueError("decoding runs at pipeline_model_parallel_size=1 (the loop needs each step's logits "
                         "where it feeds the next position); load the checkpoint with PP=1 (any TP), "
                         "e.g. inference.load.load_for_inference, which reshards it")
    if model.config.sequence_parallel:
        raise ValueError("decoding runs without sequence parallelism: build the model with "
                         "model.parallel.sequence_parallel=false (checkpoints load either way)")
    if model.ualm.parallel.transformer_impl != "local":
        raise ValueError("Megatron decoding uses the local layer spec (its attention takes an explicit padding "
                         "mask); load the checkpoint with model.parallel.transformer_impl=local")


class MegatronBackend:
    """``UALMLanguageModel`` (PP=1, any TP) decoding with ``StaticInferenceContext``."""

    def __init__(self, model, rows: int, max_length: int) -> None:
        check_decodable(model)
        self.model, self.max_length = model.eval(), max_length
        self.device = next(model.parameters()).device
        vocab = model.ualm.vocab
        self.pad_row = torch.tensor(vocab.text_position_streams(vocab.pad_id))
        self.context = StaticInferenceContext(max_batch_size=rows, max_sequence_length=max_length)
        self.valid = self.rotary = None

    def _forward(self, hidden: torch.Tensor, mask: torch.Tensor, text: bool) -> Logits:
        """hidden [t, R, h] of the new positions -> logits at the last one; the cache advances by t."""
        out = self.model.decoder(hidden_states=hidden, attention_mask=mask, rotary_pos_emb=self.rotary,
                                 inference_context=self.context)
        self.context.increment_sequence_len_offset(hidden.shape[0])
        stream0, codebooks = self.model.heads.logits(out[-1:], text=text)
        return stream0[:, 0], codebooks[:, 0]

    def prefill(self, prompts: Sequence[torch.Tensor], audio_features: Sequence[Sequence[torch.Tensor]],
                text: bool = True) -> Logits:
        tokens, valid = left_pad(prompts, self.pad_row)
        if tokens.shape[1] > self.max_length:
            raise ValueError(f"prompt of {tokens.shape[1]} positions exceeds the cache of {self.max_length}")
        features, lens = batch_features(audio_features)
        self.valid = valid.to(self.device)
        pad = (~valid).sum(1)
        slots = (torch.arange(self.max_length)[None] - pad[:, None]).clamp(min=0)  # every slot's position
        self.rotary = self.model.rotary(self.max_length, slots.to(self.device))  # [max_length, R, 1, d]
        hidden = self.model.embed(tokens.to(self.device), None if features is None else features.to(self.device),
                                  None if lens is None else lens.to(self.device))
        mask = packed_attention_mask(torch.where(self.valid, 0, -1))  # causal among real slots
        return self._forward(hidden, mask, text)

    def step(self, ids: torch.Tensor, text: bool = True) -> Logits:
        self.valid = torch.cat([self.valid, self.valid.new_ones(self.valid.shape[0], 1)], dim=1)
        if self.valid.shape[1] > self.max_length:
            raise ValueError(f"decoding ran past the cache of {self.max_length} positions")
        self.context.enable_decode_mode()
        mask = ~self.valid[:, None, None, :]  # [R, 1, 1, keys]: the new position sees every real slot
        return self._forward(self.model.embed(ids.to(self.device)), mask, text)

    def keep(self, rows: torch.Tensor) -> None:
        rows = rows.to(self.device)
        memory = self.context.key_value_memory_dict
        for layer, (keys, values) in memory.items():  # [max_length, R, groups, head_dim] each
            memory[layer] = (keys.index_select(1, rows), values.index_select(1, rows))
        self.context.max_batch_size = int(rows.numel())
        self.rotary, self.valid = self.rotary.index_select(1, rows), self.valid[rows]


def megatron_full_forward(model) -> FullForward:
    """The Megatron model as a :data:`backends.FullForward` (the recompute reference)."""
    def forward(tokens, valid, position_ids, features, lens):
        return model(tokens, audio_features=features, audio_feature_lens=lens, position_ids=position_ids,
                     segment_ids=torch.where(valid, 0, -1))
    return forward


__all__ = ["MegatronBackend", "check_decodable", "megatron_full_forward", "positions"]
