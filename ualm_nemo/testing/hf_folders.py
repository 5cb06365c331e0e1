"""A random tiny HF Qwen2 folder, built offline from the tiny UALM config (conversion and command tests)."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_cfg(tp: int = 1, pp: int = 1):
    from ualm_nemo.model.config import AudioInputConfig, BACKBONES, UALMConfig

    cfg = UALMConfig(backbone=BACKBONES["tiny"], audio_in=AudioInputConfig(random_encoder=True))
    return cfg.with_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)


def make_hf_folder(path: Path, max_shard_size: str = "200KB") -> Path:
    """Random tiny Qwen2ForCausalLM (norms ~1, all else N(0, 0.1): a wrong map cannot pass) in several shards,
    plus stand-in tokenizer files (copied verbatim by the export; their content does not matter here)."""
    from transformers import Qwen2ForCausalLM

    from ualm_nemo.convert.qwen2_keymap import qwen2_config_for

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(qwen2_config_for(tiny_cfg()))
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(1.0 + 0.2 * torch.randn_like(param)) if "norm" in name else param.normal_(0.0, 0.1)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    (path / "tokenizer_config.json").write_text('{"model_max_length": 4096}\n')
    (path / "tokenizer.json").write_text('{"version": "1.0"}\n')
    return path
