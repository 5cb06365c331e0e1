r"""DPO math: which positions a sequence log-probability counts, and the preference losses.

Sequence log-probability of a response (chosen or rejected assistant turn), per stream n::

    logp_n = - sum over scored positions t of nll[t, n]           (nll from StreamHeads.stream_nll)
    logp   = sum_n stream_weights[n] * logp_n

A position is *scored* where its label is learned (not IGNORE) and the decoder really chose it. The decoder
(inference/engine.py) does not choose what the delay pattern forces: on streams 1..N-1 every pad of the grid (the
leading ``j < n`` and trailing ``j >= F + n`` ones), on stream 0 every pad after the first (the first is the
model's decision to end the audio), and the ``<|audio_end|>`` after the grid. Those are left out, so two clips
are compared on what the model decided, not on bookkeeping both share.

Losses per pair, with ``h = (logp_c - ref_c) - (logp_r - ref_r)`` (TRL's DPOTrainer semantics)::

    sigmoid (DPO):  -log sigmoid(beta * h)
    ipo:            (h' - 1 / (2 beta))^2, h' from log-probs averaged over each response's scored elements
    total:          preference + sft_weight * (chosen's weighted LM loss per stream-0 target)

Rewards: ``beta * (logp - ref)`` for chosen and rejected; margin = their difference; accuracy = margin > 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ualm_nemo.model.config import ConfigError
from ualm_nemo.model.vocab import IGNORE_INDEX, UnifiedVocab

LOSSES = ("sigmoid", "ipo")
REFERENCES = ("offline", "online")


@dataclass(kw_only=True)
class DPOConfig:
    """conf/stage/dpo.yaml's ``dpo`` section."""

    beta: float = 0.1
    loss: str = "sigmoid"  # "sigmoid" (DPO) or "ipo"
    sft_weight: float = 0.0  # weight of the LM loss on the chosen response
    stream_weights: list[float] | None = None  # per stream, default 1.0 each (text and every codebook alike)
    reference: str = "offline"  # "offline": log-probs from reference_logps; "online": a frozen reference model
    reference_logps: str | None = None  # sidecar written by examples/score_reference.py (offline)
    reference_checkpoint: str | None = None  # the reference weights (online; checked against the sidecar offline)

    def validate(self, num_streams: int) -> "DPOConfig":
        if not (self.beta > 0 and self.beta < float("inf")):
            raise ConfigError(f"dpo.beta={self.beta} must be a finite number > 0")
        if self.loss not in LOSSES:
            raise ConfigError(f"dpo.loss={self.loss!r}: choose one of {LOSSES}")
        if not 0.0 <= self.sft_weight < float("inf"):
            raise ConfigError(f"dpo.sft_weight={self.sft_weight} must be a finite number >= 0")
        if self.stream_weights is not None:
            if len(self.stream_weights) != num_streams:
                raise ConfigError(f"dpo.stream_weights has {len(self.stream_weights)} values for {num_streams} "
                                  "streams")
            if any(not 0.0 <= w < float("inf") for w in self.stream_weights) or not any(self.stream_weights):
                raise ConfigError(f"dpo.stream_weights={self.stream_weights}: finite values >= 0, not all zero")
        if self.reference not in REFERENCES:
            raise ConfigError(f"dpo.reference={self.reference!r}: choose one of {REFERENCES}")
        if self.reference == "offline" and not self.reference_logps:
            raise ConfigError("dpo.reference=offline needs dpo.reference_logps (write it with "
                              "examples/score_reference.py), or set dpo.reference=online")
        if self.reference == "online" and not self.reference_checkpoint:
            raise ConfigError("dpo.reference=online needs dpo.reference_checkpoint (the frozen reference weights)")
        return self

    def weights(self, num_streams: int) -> torch.Tensor:
        return torch.tensor(self.stream_weights if self.stream_weights is not None else [1.0] * num_streams,
                            dtype=torch.float64)


def score_mask(labels: torch.Tensor, vocab: UnifiedVocab) -> torch.Tensor:
    """labels [b, s, N] -> bool [b, s, N]: the elements a sequence log-probability sums (module docstring)."""
    learned = labels != IGNORE_INDEX
    pads = torch.as_tensor(vocab.audio_pad_ids(), device=labels.device)  # [N]
    is_pad = labels == pads
    forced = is_pad.clone()
    # stream 0: the first pad after codes (the end decision) is chosen, the pads after it are forced
    first0 = is_pad[..., 0] & ~torch.nn.functional.pad(is_pad[..., 0], (1, 0))[:, :-1]
    forced[..., 0] = is_pad[..., 0] & ~first0
    forced[..., 0] |= labels[..., 0] == vocab.audio_end_id
    return learned & ~forced


class PairStats(NamedTuple):
    """Per pair [P] (per stream [P, N] for ``stream_margin``)."""

    loss: torch.Tensor
    preference: torch.Tensor
    sft: torch.Tensor
    reward_chosen: torch.Tensor
    reward_rejected: torch.Tensor
    stream_margin: torch.Tensor


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor, beta: float, kind: str = "sigmoid") -> torch.Tensor:
    """Per-pair loss from (already stream-weighted) sequence log-probs [P] (TRL's formulas)."""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if kind == "sigmoid":
        return -F.logsigmoid(beta * h)
    if kind == "ipo":
        return (h - 1.0 / (2.0 * beta)) ** 2
    raise ValueError(f"unknown DPO loss {kind!r}: choose one of {LOSSES}")


def pair_stats(policy: torch.Tensor, reference: torch.Tensor, counts: torch.Tensor, sft: torch.Tensor,
               cfg: DPOConfig) -> PairStats:
    """policy / reference per-stream log-probs [2P, N] and scored-element counts [2P, N] of rows interleaved
    chosen, rejected, chosen, ...; ``sft`` [P]: the chosen rows' LM loss. -> the statistics of each pair."""
    w = cfg.weights(policy.shape[1]).to(policy.device, policy.dtype)
    pc, pr, rc, rr = policy[0::2], policy[1::2], reference[0::2], reference[1::2]
    if cfg.loss == "ipo":  # IPO compares log-probs averaged over each response's scored elements
        nc, nr = (counts[0::2] * w).sum(-1).clamp(min=1), (counts[1::2] * w).sum(-1).clamp(min=1)
        pref = preference_loss((pc * w).sum(-1) / nc, (pr * w).sum(-1) / nr, (rc * w).sum(-1) / nc,
                               (rr * w).sum(-1) / nr, cfg.beta, "ipo")
    else:
        pref = preference_loss((pc * w).sum(-1), (pr * w).sum(-1), (rc * w).sum(-1), (rr * w).sum(-1), cfg.beta)
    reward_c = cfg.beta * ((pc - rc) * w).sum(-1)
    reward_r = cfg.beta * ((pr - rr) * w).sum(-1)
    stream_margin = cfg.beta * ((pc - rc) - (pr - rr)) * w
    return PairStats(pref + cfg.sft_weight * sft, pref, sft, reward_c, reward_r, stream_margin)


@dataclass
class DPOMetrics:
    """Means over the pairs of a step (what is logged under ``dpo/``)."""

    loss: float
    preference_loss: float
    sft_loss: float
    reward_chosen: float
    reward_rejected: float
    margin: float
    accuracy: float
    stream_margin: list[float] = field(default_factory=list)

    def as_log(self) -> dict[str, float]:
        out = {f"dpo/{k}": v for k, v in vars(self).items() if k != "stream_margin"}
        out.update({f"dpo/margin_stream{n}": m for n, m in enumerate(self.stream_margin)})
        return out
