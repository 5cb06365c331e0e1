r"""MicroBatch: the one batch type every collate function builds and every training consumer reads.

It sits in data/ so that data/ builds it and training/, posttrain/ and evaluation read it, every import running
downward; model/ never sees it (``UALMLanguageModel.forward`` keeps its keyword signature: ``model_inputs()``
is the bridge). Shapes are batch-first; b rows, s positions, N streams (8 X-Codec codebooks)::

    tokens / labels / loss_weights  [b, s, N]  samples from position 0, then <|pad|> rows (IGNORE labels, 0 weight)
    lengths                         [b]        filled positions per row (throughput reports, benchmarks/)
    tasks                           list[str]  one per *sample*, row-major (one per row unless packed), what
                                               validation's per-task loss reads; None on DPO pair batches
    audio_features                  [clips, n_mel, F_max] zero-padded log-mel, row-major and each sample's
                                               in placeholder order; None without heard audio
    audio_feature_lens              [clips]    mel frames of each clip; None with audio_features
    position_ids / segment_ids      [b, s]     packed rows only (batching.collate_packed): positions restart at 0
                                               per sample, segments 0, 1, ... per sample and -1 on padding;
                                               None for one sample per row (positions 0..s-1, causal attention)
    pair_ids                        list[str]  DPO (posttrain_dataset.collate_pairs): one per pair, pair k at
                                               rows 2k (chosen) and 2k + 1 (rejected)
    ref_logps                       [b, N]     DPO: the reference's per-stream sequence log-probs (float64), set
                                               from the sidecar (training/dpo_reference.attach) or by the engine
    ids                             list[str]  Shar: source/cut id per sample (a DPO batch: per pair)
    loader_state                    dict       Shar: the loader's position after this micro-batch

Lightning moves it to the device as it is (``apply_to_collection`` rebuilds dataclasses field by field), and
``lightning.fabric.utilities.move_data_to_device`` does the same outside the Trainer: no method of our own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(eq=False)  # tensors have no truth value: compare batches field by field
class MicroBatch:
    """One micro-batch (module docstring: every field, its shape and who fills it)."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_weights: torch.Tensor
    lengths: torch.Tensor
    tasks: list[str] | None
    audio_features: torch.Tensor | None = None
    audio_feature_lens: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    segment_ids: torch.Tensor | None = None
    pair_ids: list[str] | None = None
    ref_logps: torch.Tensor | None = None
    ids: list[str] | None = None
    loader_state: dict[str, Any] | None = None

    @property
    def rows(self) -> int:
        return self.tokens.shape[0]

    def model_inputs(self) -> dict[str, torch.Tensor | None]:
        """The keyword inputs of ``UALMLanguageModel.forward`` (model/ualm.py)."""
        return {"tokens": self.tokens, "labels": self.labels, "loss_weights": self.loss_weights,
                "audio_features": self.audio_features, "audio_feature_lens": self.audio_feature_lens,
                "position_ids": self.position_ids, "segment_ids": self.segment_ids}

    def samples_per_row(self) -> torch.Tensor:
        """[b] samples in each row: 1 each, or a packed row's segment count (its segment ids are 0..k-1)."""
        if self.segment_ids is None:
            return torch.ones(self.rows, dtype=torch.long, device=self.tokens.device)
        return self.segment_ids.max(dim=1).values + 1

    def split(self, num_microbatches: int, audio_in_id: int) -> list["MicroBatch"]:
        """Equal slices along the rows; each keeps its rows' samples: clips (numbered row-major, told apart by
        their <|audio_in|> runs), tasks and ids, DPO pairs (whole: chosen and rejected stay together) and their
        reference log-probs. The loader position goes with the last slice (it is the position after them all)."""
        if self.rows % num_microbatches:
            raise ValueError(f"batch of {self.rows} rows does not split into {num_microbatches} micro-batches")
        step = self.rows // num_microbatches
        if self.pair_ids is not None and step % 2:
            raise ValueError(f"micro-batches of {step} rows would split a chosen/rejected pair")
        samples = [0, *torch.cumsum(self.samples_per_row(), 0).tolist()]  # first sample of each row
        clips = [0, *torch.cumsum(clips_per_row(self.tokens, audio_in_id), 0).tolist()]  # first clip of each row
        parts = []
        for i in range(num_microbatches):
            lo, hi = i * step, (i + 1) * step
            parts.append(MicroBatch(
                tokens=self.tokens[lo:hi], labels=self.labels[lo:hi], loss_weights=self.loss_weights[lo:hi],
                lengths=self.lengths[lo:hi], tasks=_slice(self.tasks, samples[lo], samples[hi]),
                audio_features=_slice(self.audio_features, clips[lo], clips[hi]),
                audio_feature_lens=_slice(self.audio_feature_lens, clips[lo], clips[hi]),
                position_ids=_slice(self.position_ids, lo, hi), segment_ids=_slice(self.segment_ids, lo, hi),
                pair_ids=_slice(self.pair_ids, lo // 2, hi // 2), ref_logps=_slice(self.ref_logps, lo, hi),
                ids=_slice(self.ids, lo // 2, hi // 2) if self.pair_ids is not None
                else _slice(self.ids, samples[lo], samples[hi]),
                loader_state=self.loader_state if hi == self.rows else None))
        return parts


def _slice(x, lo: int, hi: int):
    """x[lo:hi]; None stays None, and so does an empty clip slice (a micro-batch without heard audio)."""
    if x is None or (torch.is_tensor(x) and lo == hi):
        return None
    return x[lo:hi]


def clips_per_row(tokens: torch.Tensor, audio_in_id: int) -> torch.Tensor:
    """tokens [b, s, N] -> [b] runs of <|audio_in|> placeholders (one run per heard clip) in each row."""
    here = tokens[..., 0] == audio_in_id
    starts = here & ~torch.nn.functional.pad(here, (1, 0))[:, :-1]
    return starts.sum(dim=1)
