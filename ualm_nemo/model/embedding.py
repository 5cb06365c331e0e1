"""Input embedding of the 8-stream sequence: the sum of the streams' embeddings, codebook pads embedding zero.

Two vocab-parallel tables, so a stage can freeze one and train the other (the ``align`` stage trains only the
audio rows): ``text`` holds Qwen text ids + UALM specials, ``audio`` the 8 x (1024 + 1) codebook ids. Each
rank looks up its own rows for every stream, sums locally and all-reduces once (not once per stream).
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel import VocabParallelEmbedding
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from ualm_nemo.model.config import UALMConfig, padded


def _local_lookup(table: VocabParallelEmbedding, ids: torch.Tensor, first_id: int, keep: torch.Tensor) -> torch.Tensor:
    """Rows of ``table`` held by this rank for ``ids`` (global unified ids; the table starts at ``first_id``).

    ids, keep: [b, s] -> [b, s, h]; positions whose row lives elsewhere (or ``keep`` is False) get zeros.
    """
    local = ids - first_id - table.vocab_start_index
    here = keep & (local >= 0) & (local < table.num_embeddings_per_partition)
    rows = torch.nn.functional.embedding(local.masked_fill(~here, 0), table.weight)
    return rows * here.unsqueeze(-1).to(rows.dtype)


class MultiStreamEmbedding(MegatronModule):
    """tokens [b, s, N] (unified ids) -> hidden [s, b, h], complete on every TP rank.

    The sequence-parallel scatter is left to the caller, which first writes audio embeddings over the
    placeholder positions (they index the full sequence).
    """

    def __init__(self, config: TransformerConfig, ualm: UALMConfig) -> None:
        super().__init__(config=config)
        vocab = ualm.vocab
        self.audio_offset = vocab.audio_offset
        self.text = VocabParallelEmbedding(padded(ualm.num_text_rows), config.hidden_size,
                                           init_method=config.init_method, config=config)
        self.audio = VocabParallelEmbedding(padded(ualm.num_audio_rows), config.hidden_size,
                                            init_method=config.init_method, config=config)
        self.register_buffer("audio_pad_ids", vocab.audio_pad_ids(), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        keep = ~torch.isin(tokens, self.audio_pad_ids)  # [b, s, N]
        hidden = None
        for n in range(tokens.shape[-1]):  # 8 streams, not frames
            ids, k = tokens[..., n], keep[..., n]
            is_audio = ids >= self.audio_offset  # the text table's padding rows overlap the first audio ids
            emb = _local_lookup(self.text, ids, 0, k & ~is_audio) + \
                _local_lookup(self.audio, ids, self.audio_offset, k & is_audio)
            hidden = emb if hidden is None else hidden + emb
        hidden = hidden.transpose(0, 1).contiguous()  # [s, b, h]
        return tensor_parallel.reduce_from_tensor_model_parallel_region(hidden)
