"""UALMLanguageModel: preprocess (stream embeddings + audio splice) -> Megatron decoder -> stream heads.

Pipeline stages are decided once, by ``pre_process``/``post_process``: the first stage owns the embeddings and
the audio input path, the last owns the heads; absent parts are ``None`` and forward checks for presence.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from ualm_nemo.model.attention_mask import packed_attention_mask
from ualm_nemo.model.config import ConfigError, UALMConfig
from ualm_nemo.model.embedding import MultiStreamEmbedding
from ualm_nemo.model.heads import StreamHeads
from ualm_nemo.model.packed_seq import flatten_rows, packed_seq_params, unflatten_rows


class UALMLanguageModel(MegatronModule):
    def __init__(self, config: TransformerConfig, ualm: UALMConfig, layer_spec: ModuleSpec,
                 pre_process: bool = True, post_process: bool = True,
                 pg_collection: ProcessGroupCollection | None = None, vp_stage: int | None = None) -> None:
        """``pg_collection``: the process groups every parallel part uses (default: megatron's global ones,
        read once here); the embedding, the heads, the sequence-parallel scatter and the decoder get them passed.
        ``vp_stage``: the virtual pipeline stage of this chunk (VPP), which picks its decoder layers."""
        super().__init__(config=config)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        self.pg_collection = pg_collection
        self.model_type = ModelType.encoder_or_decoder  # read by Megatron's pipeline schedules
        self.share_embeddings_and_output_weights = False  # read by finalize_model_grads (untied head)
        self.vp_stage = vp_stage  # read by megatron's schedules (checked against the chunk they run)
        self.ualm = ualm
        self.pre_process, self.post_process = pre_process, post_process
        self.audio_in_id = ualm.vocab.audio_in_id
        self.embedding = MultiStreamEmbedding(config, ualm, pg_collection.tp) if pre_process else None
        self.audio_input = None
        if pre_process and ualm.audio_in.enabled:
            from ualm_nemo.model.audio_input import AudioInput  # transformers import only where needed

            self.audio_input = AudioInput(ualm.audio_in, config.hidden_size).to(config.params_dtype)
        self.rotary_pos_emb = RotaryEmbedding(kv_channels=config.kv_channels, rotary_percent=1.0,
                                              rotary_base=ualm.backbone.rope_base, use_cpu_initialization=True)
        self.decoder = TransformerBlock(config=config, spec=layer_spec, pre_process=pre_process,
                                        post_process=post_process, pg_collection=pg_collection, vp_stage=vp_stage)
        self.heads = StreamHeads(config, ualm, pg_collection.tp) if post_process else None

    def set_input_tensor(self, input_tensor: torch.Tensor | list[torch.Tensor]) -> None:
        """Pipeline schedules hand the previous stage's activations here."""
        if isinstance(input_tensor, list):
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def embed(self, tokens: torch.Tensor, audio_features: torch.Tensor | None = None,
              audio_feature_lens: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [b, s, N] -> [s, b, h] ([s/tp, b, h] under SP); encoder outputs over ``<|audio_in|>``."""
        hidden = self.embedding(tokens)
        if audio_features is not None:
            if self.audio_input is None:
                raise ValueError("batch carries audio features but model.audio_in.enabled is false")
            from ualm_nemo.model.audio_input import splice_audio_embeddings

            audio = self.audio_input(audio_features, audio_feature_lens).to(hidden.dtype)
            hidden = splice_audio_embeddings(hidden, tokens[..., 0] == self.audio_in_id, audio)
        if self.config.sequence_parallel:
            hidden = tensor_parallel.scatter_to_sequence_parallel_region(hidden, group=self.pg_collection.tp)
        return hidden

    def forward(self, tokens: torch.Tensor | None, labels: torch.Tensor | None = None,
                loss_weights: torch.Tensor | None = None, audio_features: torch.Tensor | None = None,
                audio_feature_lens: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None, seq_length: int | None = None, per_stream: bool = False):
        """Per-position loss [b, s] when labels are given (last stage), logits otherwise, hidden on other stages.

        tokens/labels/loss_weights [b, s, N]; audio_features [n_audio, n_mel, frames]. Packed rows (several
        samples per row) carry ``position_ids`` [b, s] restarting per sample and ``segment_ids`` [b, s] (-1 =
        padding): attention then stays inside each sample, through a block-causal mask on the local spec and as
        THD sequences on Transformer Engine (model/packed_seq.py: the rows run as one row of b*s tokens, hidden
        states between pipeline stages are [b*s, 1, h], outputs come back as [b, s, ...]). ``per_stream``: the
        last stage returns each stream's negative log-likelihood [b, s, N] instead (DPO's sequence
        log-probabilities). Middle and last pipeline stages receive their input through ``set_input_tensor``;
        they still get ``tokens`` (or ``seq_length``) for the sequence length.
        """
        packed = self._packed_seq_params(segment_ids, position_ids)  # packed rows on TE: THD, else None
        if packed is not None:  # the rows laid end to end: one row of b*s tokens, outputs shaped back at the end
            rows = tuple(segment_ids.shape)
            tokens, labels, loss_weights = (flatten_rows(x) for x in (tokens, labels, loss_weights))
        hidden = self.embed(tokens, audio_features, audio_feature_lens) if self.embedding is not None else None
        seq = tokens.shape[1] if tokens is not None else seq_length
        if packed is not None:  # [max_seqlen, 1, 1, d]: megatron's THD rope restarts them at each cu_seqlens start
            rotary, mask = self.rotary_pos_emb(packed.max_seqlen_q), None
        else:  # attention_mask=None: the causal mask is generated by the attention (right padding keeps it exact)
            rotary = self.rotary(seq, position_ids)
            mask = self._block_mask(segment_ids) if segment_ids is not None else None
        hidden = self.decoder(hidden_states=hidden, attention_mask=mask, rotary_pos_emb=rotary,
                              packed_seq_params=packed)
        if self.heads is None:
            return hidden
        if labels is None:
            out = self.heads.logits(hidden)
        elif per_stream:
            out = self.heads.stream_nll(hidden, labels)
        else:
            out = self.heads.loss(hidden, labels, loss_weights)
        return out if packed is None else unflatten_rows(out, rows)

    def rotary(self, seq: int, position_ids: torch.Tensor | None) -> torch.Tensor:
        """RoPE frequencies [s, 1, 1, d], or [s, b, 1, d] at explicit (packed) positions."""
        freqs = self.rotary_pos_emb(seq if position_ids is None else max(seq, int(position_ids.max()) + 1))
        if position_ids is None:
            return freqs
        return freqs[position_ids.transpose(0, 1), 0]  # [s, b, 1, d]

    def _packed_seq_params(self, segment_ids: torch.Tensor | None,
                           position_ids: torch.Tensor | None) -> PackedSeqParams | None:
        """THD parameters for packed rows on Transformer Engine (its fused attention takes no block mask)."""
        if segment_ids is None or self.ualm.parallel.transformer_impl != "transformer_engine":
            return None
        if self.config.context_parallel_size > 1:
            raise ConfigError("packed rows (data.shar.pack=true) with context parallelism are not supported (THD "
                              "sequences would need splitting per CP rank): set data.shar.pack=false")
        return packed_seq_params(segment_ids, position_ids)

    @staticmethod
    def _block_mask(segment_ids: torch.Tensor) -> torch.Tensor:
        return packed_attention_mask(segment_ids)
