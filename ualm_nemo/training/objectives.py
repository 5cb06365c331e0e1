"""What a training step optimises, as a pair (model call, loss) the engine hands to Megatron's schedule.

* ``LMObjective``: pre-training and SFT. The weighted per-position loss, normalised by the count of stream-0
  targets over all micro-batches and DP ranks (megatron's ``calculate_per_token_loss``).
* ``DPOObjective``: preference optimisation. Rows come in pairs (chosen at even rows, rejected at odd rows,
  ``data/posttrain_dataset.collate_pairs``) with the reference's per-stream log-probs in ``ref_logps`` [b, N]
  (``data/microbatch.MicroBatch``); the loss is summed over pairs and normalised by the global pair count.
* ``RowLogProbs``: forward only, each row's per-stream sequence log-probs (the reference scorer and the online
  reference).

Each objective's report is one vector per micro-batch whose first two entries are (loss sum, normaliser); the
engine sums it over micro-batches and DP and ``summarise`` turns the total into the logged figures.
"""

from __future__ import annotations

import torch

from ualm_nemo.data.microbatch import MicroBatch
from ualm_nemo.model.vocab import IGNORE_INDEX, UnifiedVocab
from ualm_nemo.training.dpo import DPOConfig, DPOMetrics, pair_stats, score_mask

REPORT = "report"


class LMObjective:
    per_stream = False

    def loss(self, batch: MicroBatch, output: torch.Tensor):
        """Sum of per-position losses and the count of stream-0 targets (the normaliser, summed by Megatron)."""
        num = (batch.labels[..., 0] != IGNORE_INDEX).sum()
        loss = output.float().sum()
        return loss, num.to(torch.int), {REPORT: torch.stack([loss.detach(), num.detach().float()])}

    def summarise(self, total: torch.Tensor) -> None:
        return None


def row_log_probs(batch: MicroBatch, nll: torch.Tensor, vocab: UnifiedVocab) -> tuple[torch.Tensor, torch.Tensor]:
    """nll [b, s, N] -> (per-stream sequence log-probs [b, N] float64, scored-element counts [b, N])."""
    mask = score_mask(batch.labels, vocab)
    return -(nll.double() * mask).sum(1), mask.sum(1).double()


class RowLogProbs:
    per_stream = True

    def __init__(self, vocab: UnifiedVocab) -> None:
        self.vocab = vocab

    def loss(self, batch: MicroBatch, nll: torch.Tensor):
        logps, counts = row_log_probs(batch, nll, self.vocab)
        zero = nll.sum() * 0.0
        return zero, torch.ones((), dtype=torch.int), {REPORT: torch.zeros(2, device=nll.device),
                                                       "row_logps": logps.detach(), "row_counts": counts}

    def summarise(self, total: torch.Tensor) -> None:
        return None


class DPOObjective:
    per_stream = True

    def __init__(self, cfg: DPOConfig, vocab: UnifiedVocab) -> None:
        self.cfg, self.vocab = cfg, vocab

    def loss(self, batch: MicroBatch, nll: torch.Tensor):
        rows = nll.shape[0]
        if rows % 2:
            raise ValueError(f"a DPO micro-batch holds chosen/rejected pairs: {rows} rows is odd")
        if batch.ref_logps is None:
            raise ValueError("a DPO micro-batch needs the reference's log-probs (ref_logps)")
        logps, counts = row_log_probs(batch, nll, self.vocab)
        chosen_nll = (nll[0::2].double() * batch.loss_weights[0::2].double()).sum((1, 2))
        chosen_targets = (batch.labels[0::2, :, 0] != IGNORE_INDEX).sum(1).clamp(min=1)
        stats = pair_stats(logps, batch.ref_logps.to(logps), counts, chosen_nll / chosen_targets, self.cfg)
        pairs = rows // 2
        margin = stats.reward_chosen - stats.reward_rejected
        report = torch.cat([torch.stack([stats.loss.sum(), torch.tensor(float(pairs), dtype=torch.float64,
                                                                         device=nll.device),
                                         stats.preference.sum(), stats.sft.sum(), stats.reward_chosen.sum(),
                                         stats.reward_rejected.sum(), (margin > 0).double().sum(), margin.sum()]),
                            stats.stream_margin.sum(0)]).detach()
        return stats.loss.sum().float(), torch.tensor(pairs, dtype=torch.int, device=nll.device), {REPORT: report}

    def summarise(self, total: torch.Tensor) -> DPOMetrics:
        n = max(float(total[1]), 1.0)
        v = (total / n).tolist()
        return DPOMetrics(loss=v[0], preference_loss=v[2], sft_loss=v[3], reward_chosen=v[4], reward_rejected=v[5],
                          accuracy=v[6], margin=v[7], stream_margin=v[8:])
