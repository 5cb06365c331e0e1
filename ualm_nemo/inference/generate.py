"""Decoding for a single-stage (TP1/PP1) UALM: text greedy, audio with CFG over the delay pattern.

Two ways to step a model, picked by what it offers (``use_cache=False`` forces the second, e.g. to compare):
* a model with ``decode(tokens, cache, **audio)`` (the HF-side ``UALMForConditionalGeneration``) is fed only the
  new positions each step against its KV cache;
* any other model mapping tokens [b, s, N] -> (stream-0 logits, codebook logits) (the Megatron model) gets the
  whole sequence again each step: exact and simple, O(length) work per step; KV-cached Megatron inference
  is future work.

Audio decoding walks the delayed grid frame by frame. At grid frame ``j``, stream ``n``:
* ``j < n``: the delay's leading pad (forced);
* stream 0 samples codebook 0 or its pad; its first pad marks the end ``F`` of the audio;
* streams n >= 1 sample real codes while ``j < F + n``, then the trailing pad (forced);
the grid ends at ``F + N - 1`` frames, ``<|audio_end|>`` follows, and ``revert_delay`` recovers codes [F, N].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ualm_nemo.inference.sampling import cfg_mix, sample_top_k
from ualm_nemo.model.delay_pattern import revert_delay
from ualm_nemo.model.vocab import UnifiedVocab


@dataclass(kw_only=True)
class AudioGenerationConfig:
    """Paper defaults: cfg 3, temperature 0.8, top-k 20, at most 1024 frames (20.5 s at 50 Hz)."""

    cfg_scale: float = 3.0
    temperature: float = 0.8
    top_k: int = 20
    max_frames: int = 1024
    min_frames: int = 1
    seed: int = 0


class _Recompute:
    """Steps any model by running it over the whole sequence each time."""

    def __init__(self, model, sequences: torch.Tensor, **audio) -> None:
        self.model, self.sequences, self.audio = model, sequences, audio

    def logits(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Stream-0 logits [b, V] and codebook logits [b, N-1, span] at the last position (fp32)."""
        stream0, codebooks = self.model(self.sequences, **self.audio)
        return stream0[:, -1].float(), codebooks[:, -1].float()

    def append(self, ids: torch.Tensor) -> None:
        """ids [b, 1, N]: the next position of every row."""
        self.sequences = torch.cat([self.sequences, ids], dim=1)


class _Incremental:
    """Steps a model that keeps a KV cache: ``model.decode(new positions, cache, **audio)``."""

    def __init__(self, model, sequences: torch.Tensor, **audio) -> None:
        self.model = model
        self.stream0, self.codebooks, self.cache = model.decode(sequences, None, **audio)

    def logits(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.stream0.float(), self.codebooks.float()

    def append(self, ids: torch.Tensor) -> None:
        self.stream0, self.codebooks, self.cache = self.model.decode(ids, self.cache)


def _stepper(model, sequences: torch.Tensor, use_cache: bool, **audio) -> _Recompute | _Incremental:
    audio = {k: v for k, v in audio.items() if v is not None}
    return (_Incremental if use_cache and hasattr(model, "decode") else _Recompute)(model, sequences, **audio)


@torch.no_grad()
def generate_audio_codes(model, vocab: UnifiedVocab, prompt: torch.Tensor, uncond_prompt: torch.Tensor,
                         cfg: AudioGenerationConfig, use_cache: bool = True) -> torch.Tensor:
    """prompt / uncond_prompt [L, N] (both ending in ``<|audio_start|>``, same length) -> codes [F, N]."""
    if prompt.shape != uncond_prompt.shape:
        raise ValueError(f"conditional {tuple(prompt.shape)} and unconditional {tuple(uncond_prompt.shape)} "
                         "prompts must have the same shape")
    model.eval()
    n_streams, span = vocab.num_codebooks, vocab.codebook_span
    gen = torch.Generator().manual_seed(cfg.seed)  # sampling stays on the CPU: the same seed, the same audio
    device = next(model.parameters()).device
    steps = _stepper(model, torch.stack([prompt, uncond_prompt]).to(device), use_cache)  # cond., uncond. rows
    cb0 = slice(vocab.codebook_start(0), vocab.codebook_start(0) + span)
    end = None  # F, once stream 0 has emitted its pad
    grid = []
    j = 0
    while end is None or j < end + n_streams - 1:
        stream0, codebooks = steps.logits()
        logits = torch.cat([stream0[:, cb0].unsqueeze(1), codebooks], dim=1).cpu()  # [2, N, span]
        mixed = cfg_mix(logits[0], logits[1], cfg.cfg_scale)
        pad = vocab.codebook_size
        if end is None:  # stream 0 may end the audio (not before min_frames, forced at max_frames)
            if j < cfg.min_frames:
                mixed[0, pad] = float("-inf")
            if j >= cfg.max_frames:
                mixed[0, :pad] = float("-inf")
        mixed[1:, pad] = float("-inf")  # streams >= 1 never choose pad by themselves: pads are forced below
        codes = sample_top_k(mixed, cfg.temperature, cfg.top_k, gen)  # [N]
        stream = torch.arange(n_streams)
        if end is None and int(codes[0]) == pad:
            end = j
        forced = stream > j  # the delay's leading pads
        if end is not None:
            forced |= j >= end + stream  # trailing pads once the audio has ended
        codes = torch.where(forced, torch.full_like(codes, pad), codes)
        ids = vocab.codes_to_ids(codes)
        grid.append(ids)
        steps.append(ids.expand(2, 1, n_streams).to(device))
        j += 1
    delayed = vocab.ids_to_codes(torch.stack(grid))  # [F + N - 1, N]
    return revert_delay(delayed)


@torch.no_grad()
def generate_text(model, vocab: UnifiedVocab, prompt: torch.Tensor, stop_ids: set[int], num_text_ids: int,
                  max_new_tokens: int = 64, audio_features: torch.Tensor | None = None,
                  audio_feature_lens: torch.Tensor | None = None, use_cache: bool = True) -> list[int]:
    """Greedy text decoding (the paper decodes text greedily). prompt [L, N] -> new text ids (stop id excluded).

    Only the tokenizer's ``num_text_ids`` ids are candidates: the embedding's padding rows are not text.
    """
    model.eval()
    device = next(model.parameters()).device
    if audio_features is not None:
        audio_features, audio_feature_lens = audio_features.to(device), audio_feature_lens.to(device)
    steps = _stepper(model, prompt.unsqueeze(0).to(device), use_cache, audio_features=audio_features,
                     audio_feature_lens=audio_feature_lens)
    out: list[int] = []
    for _ in range(max_new_tokens):
        stream0, _ = steps.logits()
        next_id = int(stream0[0, :num_text_ids].argmax())
        if next_id in stop_ids:
            break
        out.append(next_id)
        steps.append(torch.tensor(vocab.text_position_streams(next_id), device=device)[None, None])
    return out
