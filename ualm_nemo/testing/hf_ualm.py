"""A random ``UALMForConditionalGeneration`` built from a model config alone (tests, benchmarks; no export)."""

from __future__ import annotations

import torch

from ualm_nemo.model.config import UALMConfig


def random_hf_ualm(cfg: UALMConfig, seed: int = 0, std: float = 0.02):
    """transformers Qwen2 + random audio parts (+ the tiny random audio tower and adapter when
    ``cfg.audio_in.enabled``), in eval mode."""
    from transformers import Qwen2ForCausalLM

    from ualm_nemo.convert.audio_parts import expected_audio_shapes
    from ualm_nemo.convert.qwen2_keymap import qwen2_config_for
    from ualm_nemo.inference.hf_model import UALMForConditionalGeneration
    from ualm_nemo.model.audio_input import AudioInput, build_audio_encoder

    torch.manual_seed(seed)
    lm = Qwen2ForCausalLM(qwen2_config_for(cfg))
    parts = {k: torch.randn(shape) * std for k, shape in expected_audio_shapes(cfg).items()}
    audio_input = None
    if cfg.audio_in.enabled:
        audio_input = AudioInput(cfg.audio_in, cfg.backbone.hidden_size, encoder=build_audio_encoder(cfg.audio_in))
    return UALMForConditionalGeneration(cfg, lm, parts, audio_input).eval()
