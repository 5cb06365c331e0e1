"""Core attention on torch's ``scaled_dot_product_attention``: the local spec's attention without [b, n, s, s].

Megatron's local ``DotProductAttention`` materialises the scores and probabilities ([b, heads, s, s] each, fp32
for the softmax); SDPA picks a flash or memory-efficient kernel on GPU (and a fused math path on CPU) that never
holds them. Drop-in: same constructor and forward as ``DotProductAttention`` (what megatron's ``SelfAttention``
passes), same inputs [s, b, heads, d], same output [s, b, heads_per_partition * d]. Chosen by
``model.attention_backend=sdpa`` through the layer spec (builder.layer_spec).

Masks follow megatron's convention (True = masked out) and megatron's semantics:

* ``attention_mask=None`` with a causal layer: causal attention (SDPA's ``is_causal``, which the flash kernel takes).
* a given mask ([b or 1, 1, sq, sk], bool): used as is, without the causal mask on top (as megatron's softmax does);
  packed rows give a block-causal one (model/attention_mask.packed_attention_mask).
* a query row that masks every key: megatron fills masked scores with -10000, so such a row attends uniformly to
  all keys (the mean of the values; no gradient to q or k); SDPA would return NaN there. Such a row is unmasked
  for SDPA and its output replaced by the mean of the values: megatron's result and gradients, all finite.
  ``packed_attention_mask`` never builds such rows (a padding position sees itself).

Scale: ``softmax_scale`` or 1/sqrt(head dim). Megatron's ``apply_query_key_layer_scaling`` divides the scores by
the layer number and multiplies them back inside the softmax, so the product is the same scale (it only changes
fp16 rounding): it is not repeated here. Dropout (``attention_dropout``, 0 in UALM's config) is SDPA's
``dropout_p`` in training, drawn under megatron's model-parallel RNG like megatron's; its pattern is not
megatron's. Not supported (refused at construction): context parallelism, sliding windows, softmax variants
other than vanilla, THD ``packed_seq_params`` and attention bias (refused in forward, as megatron does).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention
from megatron.core.utils import divide


class SDPAAttention(MegatronModule):
    """``DotProductAttention``'s interface on ``F.scaled_dot_product_attention`` (no parameters)."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection: ProcessGroupCollection | None = None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAAttention does not support context parallelism (context_parallel_size > 1)")
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number):
            raise ValueError("SDPAAttention does not support sliding-window attention (window_size)")
        if config.softmax_type != "vanilla":
            raise ValueError(f"SDPAAttention supports softmax_type='vanilla' only, got {config.softmax_type!r}")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        self.pg_collection = pg_collection
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type  # unused, as in megatron
        tp = pg_collection.tp.size()
        self.heads_per_partition = divide(config.num_attention_heads, tp)
        self.groups_per_partition = divide(config.num_query_groups, tp)
        self.softmax_scale = 1.0 / math.sqrt(config.kv_channels) if softmax_scale is None else softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type: AttnMaskType | None = None,
                attention_bias: torch.Tensor | None = None, packed_seq_params=None) -> torch.Tensor:
        """query [sq, b, np, d], key/value [sk, b, ng, d] (ng divides np) -> context [sq, b, np * d].

        ``attn_mask_type`` is ignored like megatron's (the layer's own type decides, see the module docstring).
        """
        if packed_seq_params is not None:
            raise NotImplementedError("SDPAAttention takes packed rows as a block-causal attention_mask, not THD "
                                      "packed_seq_params")
        if attention_bias is not None:
            raise NotImplementedError("SDPAAttention does not support attention_bias")
        sq, b, heads, d = query.shape
        # [s, b, n, d] -> [b, n, s, d]: SDPA's layout (a view; the kernels take the strides)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask, causal, no_keys = self._sdpa_mask(attention_mask, sq, key.shape[0])
        gqa = k.shape[1] != heads
        if gqa and mask is not None:
            # the memory-efficient kernel (the one that takes a mask) has no GQA: repeat as megatron does;
            # without a mask the flash kernel shares the KV heads itself (enable_gqa)
            k, v = (t.repeat_interleave(heads // t.shape[1], dim=1) for t in (k, v))
            gqa = False
        dropout = self.dropout_p if self.training else 0.0
        kwargs = dict(attn_mask=mask, dropout_p=dropout, is_causal=causal, scale=self.softmax_scale,
                      enable_gqa=gqa)
        if dropout > 0.0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():  # megatron's RNG for attention dropout
                context = F.scaled_dot_product_attention(q, k, v, **kwargs)
        else:
            context = F.scaled_dot_product_attention(q, k, v, **kwargs)
        if no_keys is not None:  # [b, 1, sq, 1]: megatron's uniform attention over all keys (see module docstring)
            context = torch.where(no_keys, v.mean(dim=2, keepdim=True), context)
        return context.permute(2, 0, 1, 3).reshape(sq, b, heads * d)  # [sq, b, np * d]

    def _sdpa_mask(self, attention_mask: torch.Tensor | None, sq: int,
                   sk: int) -> tuple[torch.Tensor | None, bool, torch.Tensor | None]:
        """Megatron's mask (True = masked) -> SDPA's boolean mask (True = attend), is_causal, rows without keys."""
        if attention_mask is None:
            if self.attn_mask_type == AttnMaskType.causal and sq > 1:
                if sq != sk:
                    raise ValueError(f"causal attention without a mask needs sq == sk, got {sq} and {sk}")
                return None, True, None
            return None, False, None  # sq == 1: one new position (KV cache) sees every cached key, as in megatron
        attend = ~attention_mask.bool()
        # a query row that sees no key: SDPA would give NaN; unmasked here, its output replaced in forward
        no_keys = ~attend.any(dim=-1, keepdim=True)  # [b, 1, sq, 1]
        return attend | no_keys, False, no_keys
