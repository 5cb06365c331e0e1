"""Output heads and the UALM loss, vocab-parallel under TP.

Stream 0 (text and codebook 0) is scored over the whole unified vocabulary: the local shards of the text and
audio heads are concatenated, which is a fixed permutation of the global vocabulary, so megatron's
``vocab_parallel_cross_entropy`` applies once targets are permuted the same way (softmax does not care about
column order). Streams 1..N-1 are scored over their own codebook only (1024 codes + pad):

* ``shared``: the audio head's rows of codebook n applied to ``h + e_n`` (a learned per-stream embedding,
  none for stream 0). Each rank scores the rows it holds and one all-reduce assembles the codebook's logits.
* ``per_codebook``: MusicGen-style separate heads [N-1, 1025, h], replicated across TP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from ualm_nemo.model.column_mask import column_ranges, fill_columns_
from ualm_nemo.model.config import UALMConfig, padded
from ualm_nemo.model.vocab import IGNORE_INDEX

_MASKED = -1.0e30  # logit for padded vocabulary columns (finite: avoids inf - inf in the softmax)


class StreamHeads(MegatronModule):
    def __init__(self, config: TransformerConfig, ualm: UALMConfig, tp_group: torch.distributed.ProcessGroup) -> None:
        super().__init__(config=config)
        self.tp_group = tp_group
        vocab = ualm.vocab
        self.kind = ualm.audio_out.head
        self.num_streams = vocab.num_codebooks
        self.span = vocab.codebook_span
        self.audio_offset = vocab.audio_offset
        self.num_text_rows, self.num_audio_rows = ualm.num_text_rows, ualm.num_audio_rows
        self.tp, self.tp_rank = self.tp_group.size(), self.tp_group.rank()
        linear = dict(config=config, init_method=config.init_method, bias=False, gather_output=False,
                      skip_bias_add=True, tp_group=self.tp_group)
        self.text_head = tensor_parallel.ColumnParallelLinear(config.hidden_size, padded(self.num_text_rows), **linear)
        self.audio_head = tensor_parallel.ColumnParallelLinear(config.hidden_size, padded(self.num_audio_rows), **linear)
        self.text_part = padded(self.num_text_rows) // self.tp
        self.audio_part = padded(self.num_audio_rows) // self.tp
        extra = self.num_streams - 1
        if self.kind == "shared":
            self.stream_embedding = torch.nn.Parameter(torch.zeros(extra, config.hidden_size,
                                                                   dtype=config.params_dtype))
            config.init_method(self.stream_embedding)
            self.stream_embedding.sequence_parallel = config.sequence_parallel  # grads reduced over TP when SP
        else:
            self.codebook_heads = torch.nn.Parameter(torch.empty(extra, self.span, config.hidden_size,
                                                                 dtype=config.params_dtype))
            config.init_method(self.codebook_heads)
        self.register_buffer("padded_columns", self._padded_column_mask(), persistent=False)
        self.padded_ranges = column_ranges(self.padded_columns)  # runs of this rank's padded local columns

    # --- index bookkeeping --------------------------------------------------------------------
    def _padded_column_mask(self) -> torch.Tensor:
        """[text_part + audio_part] True where this rank's local column is vocabulary padding."""
        text_cols = torch.arange(self.text_part) + self.tp_rank * self.text_part
        audio_cols = torch.arange(self.audio_part) + self.tp_rank * self.audio_part
        return torch.cat([text_cols >= self.num_text_rows, audio_cols >= self.num_audio_rows])

    def _permuted_target(self, ids: torch.Tensor) -> torch.Tensor:
        """Global unified ids -> column index in the rank-concatenated [text_r | audio_r] layout."""
        width = self.text_part + self.audio_part
        is_text = ids < self.audio_offset
        audio = (ids - self.audio_offset).clamp(min=0)
        text_col = (ids // self.text_part) * width + ids % self.text_part
        audio_col = (audio // self.audio_part) * width + self.text_part + audio % self.audio_part
        return torch.where(is_text, text_col, audio_col)

    def _unpermute(self, gathered: torch.Tensor) -> torch.Tensor:
        """[..., tp * (text_part + audio_part)] -> [..., vocab size] in unified-id order."""
        chunks = gathered.split(self.text_part + self.audio_part, dim=-1)
        text = torch.cat([c[..., : self.text_part] for c in chunks], dim=-1)[..., : self.num_text_rows]
        audio = torch.cat([c[..., self.text_part:] for c in chunks], dim=-1)[..., : self.num_audio_rows]
        return torch.cat([text, audio], dim=-1)

    # --- logits ---------------------------------------------------------------------------------
    def _stream0_local_logits(self, hidden: torch.Tensor, text: bool = True) -> torch.Tensor:
        """hidden [s, b, h] -> this rank's stream-0 logits [s_full, b, text_part + audio_part].

        ``text=False`` (decoding steps that read only audio columns) leaves the text columns masked instead of
        computing the text head."""
        if not text:
            audio, _ = self.audio_head(hidden)
            masked = audio.new_full((*audio.shape[:-1], self.text_part), _MASKED)
            return torch.cat([masked, audio], dim=-1).masked_fill(self.padded_columns, _MASKED)
        # both heads in one matmul over this rank's [text | audio] rows, padded columns then filled in place: no
        # [s, b, vocab] concatenation, masked copy or bias copy of the logits (forward), nor slices or copies of
        # their grad (backward). The input handling is ColumnParallelLinear's: all-gather under SP, else identity.
        if self.config.sequence_parallel:
            full = tensor_parallel.gather_from_sequence_parallel_region(hidden, group=self.tp_group)
        else:
            full = tensor_parallel.copy_to_tensor_model_parallel_region(hidden, group=self.tp_group)
        weight = torch.cat([self.text_head.weight, self.audio_head.weight])
        return fill_columns_(F.linear(full, weight), self.padded_ranges, _MASKED)

    def _codebook_logits(self, hidden: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [s, b, h] -> logits of streams 1..N-1 over their codebook, [N-1, s_full, b, span] (full).

        ``positions`` (flat indices into the full [s_full * b] positions, e.g. those with a codebook label) scores
        only those rows: [N-1, len(positions), span]. Under SP the hidden states are gathered first, once."""
        sp = self.config.sequence_parallel
        if self.kind == "per_codebook":  # heads replicated across TP: every rank computes the full logits
            full = hidden if not sp else tensor_parallel.gather_from_sequence_parallel_region(
                hidden, tensor_parallel_output_grad=False, group=self.tp_group)
            return self._per_stream_matmul(self._rows(full, positions).unsqueeze(0), self.codebook_heads,
                                           full if positions is None else None)
        if sp:  # backward reduce-scatters the partial input grads; the stream embedding's grads are all-reduced
            # over TP by finalize_model_grads (it is marked sequence_parallel)
            full = tensor_parallel.gather_from_sequence_parallel_region(hidden, group=self.tp_group)
            per_stream = self._rows(full, positions).unsqueeze(0) + self.stream_embedding[:, None, :]
        else:
            full = hidden
            per_stream = tensor_parallel.copy_to_tensor_model_parallel_region(
                self._rows(hidden, positions).unsqueeze(0) + self.stream_embedding[:, None, :], group=self.tp_group)
        # rows of codebook n held by this rank: audio row n*span + c lives at local row (that - rank*audio_part)
        rows = torch.arange(1, self.num_streams, device=hidden.device)[:, None] * self.span \
            + torch.arange(self.span, device=hidden.device) - self.tp_rank * self.audio_part
        here = (rows >= 0) & (rows < self.audio_part)  # [N-1, span]
        weight = self.audio_head.weight[rows.clamp(0, self.audio_part - 1)] * here.unsqueeze(-1).to(hidden.dtype)
        partial = self._per_stream_matmul(per_stream, weight, full if positions is None else None)
        return tensor_parallel.reduce_from_tensor_model_parallel_region(partial, group=self.tp_group)

    @staticmethod
    def _rows(full: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        """[s, b, h] -> [s * b, h], or only the rows at ``positions`` [M, h]."""
        flat = full.reshape(-1, full.shape[-1])
        return flat if positions is None else flat.index_select(0, positions)

    @staticmethod
    def _per_stream_matmul(inputs: torch.Tensor, weight: torch.Tensor, shape_of: torch.Tensor | None) -> torch.Tensor:
        """inputs [N-1 or 1, R, h] x weight [N-1, span, h] -> [N-1, R, span], or [N-1, s, b, span] when
        ``shape_of`` (the full [s, b, h] hidden) is given: one batched matmul."""
        out = torch.matmul(inputs, weight.transpose(1, 2))
        return out if shape_of is None else out.view(weight.shape[0], *shape_of.shape[:-1], weight.shape[1])

    def logits(self, hidden: torch.Tensor, text: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """For inference. Returns (stream-0 logits [b, s, vocab], codebook logits [b, s, N-1, span])."""
        local = self._stream0_local_logits(hidden, text)
        stream0 = self._unpermute(tensor_parallel.gather_from_tensor_model_parallel_region(local, group=self.tp_group))
        codebooks = self._codebook_logits(hidden)
        return stream0.transpose(0, 1), codebooks.permute(2, 1, 0, 3)

    # --- loss -------------------------------------------------------------------------------------
    def stream_nll(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-stream negative log-likelihood of each label, 0 where it is IGNORE_INDEX.

        hidden [s, b, h]; labels [b, s, N] (unified ids) -> [b, s, N]. Stream 0 is scored vocab-parallel over the
        whole unified vocabulary, streams 1..N-1 over their codebook; every TP rank returns the full values.
        Pre-training weighs and sums these (``loss``); DPO sums them into sequence log-probabilities.
        """
        labels = labels.transpose(0, 1)  # [s, b, N]
        target0 = labels[..., 0]
        valid0 = target0 != IGNORE_INDEX
        ce0 = tensor_parallel.vocab_parallel_cross_entropy(
            self._stream0_local_logits(hidden).float(), self._permuted_target(target0.masked_fill(~valid0, 0)))
        return torch.cat([(ce0 * valid0)[None], self._codebook_nll(hidden, labels[..., 1:])]).permute(2, 1, 0) \
            .contiguous()  # [b, s, N]

    def _codebook_nll(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """hidden [s, b, h]; labels [s_full, b, N-1] of streams 1..N-1 -> their nll [N-1, s_full, b], 0 where ignored.

        Only positions with a label in some stream 1..N-1 (audio frames) are scored: text positions carry none, and
        their codebook logits were most of the head's cost. Counting them is a host sync (one per micro-batch);
        zero positions still run (empty matmuls) so every parameter stays in the graph."""
        target = labels.permute(2, 0, 1)  # [N-1, s, b]
        valid = target != IGNORE_INDEX
        positions = valid.any(0).flatten().nonzero().squeeze(1)  # [M] flat indices into [s * b]
        target, valid = target.flatten(1)[:, positions], valid.flatten(1)[:, positions]  # [N-1, M]
        starts = self.audio_offset + torch.arange(1, self.num_streams, device=labels.device) * self.span
        local_target = torch.where(valid, target - starts[:, None], torch.zeros_like(target))
        logits = self._codebook_logits(hidden, positions).float()  # [N-1, M, span]
        ce = F.cross_entropy(logits.reshape(-1, self.span), local_target.reshape(-1), reduction="none")
        ce = ce.view_as(target) * valid
        scattered = ce.new_zeros(target.shape[0], labels.shape[0] * labels.shape[1]).index_copy(1, positions, ce)
        return scattered.view(-1, *labels.shape[:2])

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Weighted per-position loss summed over streams.

        hidden [s, b, h]; labels, weights [b, s, N] (labels in unified ids, IGNORE_INDEX where no loss)
        -> [b, s]. Normalisation (by counted stream-0 frames) is the caller's: it spans micro-batches and DP.
        """
        return (self.stream_nll(hidden, labels) * weights.float()).sum(-1)
