"""One entry point to decoding for either model form: ``make_decoder(model, ...)`` -> ``engine.Decoder``.

* ``UALMForConditionalGeneration`` (HF folder or training checkpoint through ``from_checkpoint``): KV cache via
  transformers (``backends.HFBackend``);
* the Megatron ``UALMLanguageModel`` (PP=1, any TP): megatron-core's static KV cache
  (``megatron_backend.MegatronBackend``).

``use_cache=False`` recomputes the whole sequence every step instead (the reference the caches are tested
against; same codes and text).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ualm_nemo.inference.backends import HFBackend, RecomputeBackend, hf_full_forward
from ualm_nemo.inference.engine import Decoder, GenerationConfig, Request, Result
from ualm_nemo.model.config import UALMConfig


def _is_hf(model) -> bool:
    from ualm_nemo.inference.hf_model import UALMForConditionalGeneration

    return isinstance(model, UALMForConditionalGeneration)


def model_config(model) -> UALMConfig:
    """The UALMConfig of either model form."""
    return model.cfg if _is_hf(model) else model.ualm


def model_vocab(model):
    return model_config(model).vocab


def make_decoder(model, num_text_ids: int, stop_ids: Sequence[int], use_cache: bool = True) -> Decoder:
    """A batched decoder over ``model``; ``num_text_ids`` and ``stop_ids`` come from the tokenizer."""
    vocab = model_vocab(model)
    model.eval()
    device = next(model.parameters()).device
    pad_row = torch.tensor(vocab.text_position_streams(vocab.pad_id))
    if _is_hf(model):
        factory = (lambda rows, length: HFBackend(model)) if use_cache else \
            (lambda rows, length: RecomputeBackend(hf_full_forward(model), pad_row, device))
    else:
        from ualm_nemo.inference.megatron_backend import MegatronBackend, check_decodable, megatron_full_forward

        check_decodable(model)
        factory = (lambda rows, length: MegatronBackend(model, rows, length)) if use_cache else \
            (lambda rows, length: RecomputeBackend(megatron_full_forward(model), pad_row, device))
    return Decoder(factory, vocab, num_text_ids, stop_ids)


def decode(model, tokenizer, requests: Sequence[Request], cfg: GenerationConfig | None = None,
           use_cache: bool = True) -> list[Result]:
    """Convenience: decode ``requests`` in one batch with the tokenizer's text ids and stop ids."""
    stop = {tokenizer.im_end_id, *tokenizer.eos_ids}
    return make_decoder(model, tokenizer.vocab_size, sorted(stop), use_cache).generate(requests, cfg)
