"""Input embedding of the 8-stream sequence: the sum of the streams' embeddings, codebook pads embedding zero.

Two vocab-parallel tables, so a stage can freeze one and train the other (the ``align`` stage trains only the
audio rows): ``text`` holds Qwen text ids + UALM specials, ``audio`` the 8 x (1024 + 1) codebook ids. Each
rank looks up its own rows for every stream, sums locally and all-reduces once (not once per stream). The
lookup is ``stream_math.embed_streams`` over this rank's shards: the reference math, applied to a shard.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel import VocabParallelEmbedding
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from ualm_nemo.model.config import UALMConfig, padded
from ualm_nemo.model.stream_math import IdTable, embed_streams


class MultiStreamEmbedding(MegatronModule):
    """tokens [b, s, N] (unified ids) -> hidden [s, b, h], complete on every TP rank.

    The sequence-parallel scatter is left to the caller, which first writes audio embeddings over the
    placeholder positions (they index the full sequence).
    """

    def __init__(self, config: TransformerConfig, ualm: UALMConfig, tp_group: torch.distributed.ProcessGroup) -> None:
        super().__init__(config=config)
        self.tp_group = tp_group
        vocab = ualm.vocab
        self.audio_offset = vocab.audio_offset
        self.num_audio_rows = ualm.num_audio_rows
        self.text = VocabParallelEmbedding(padded(ualm.num_text_rows), config.hidden_size,
                                           init_method=config.init_method, config=config, tp_group=self.tp_group)
        self.audio = VocabParallelEmbedding(padded(ualm.num_audio_rows), config.hidden_size,
                                            init_method=config.init_method, config=config, tp_group=self.tp_group)
        self.register_buffer("audio_pad_ids", vocab.audio_pad_ids(), persistent=False)

    def local_tables(self) -> tuple[IdTable, IdTable]:
        """This rank's shards of the two tables, as the id ranges they embed (stream_math.IdTable)."""
        text_first = self.text.vocab_start_index
        audio_first = self.audio_offset + self.audio.vocab_start_index
        # the text table's padding rows overlap the first audio ids: it ends at audio_offset
        return (IdTable(self.text.weight, text_first, self.audio_offset),
                IdTable(self.audio.weight, audio_first, self.audio_offset + self.num_audio_rows))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = embed_streams(tokens, self.local_tables(), self.audio_pad_ids)  # [b, s, h], this rank's rows
        hidden = hidden.transpose(0, 1).contiguous()  # [s, b, h]
        return tensor_parallel.reduce_from_tensor_model_parallel_region(hidden, group=self.tp_group)
