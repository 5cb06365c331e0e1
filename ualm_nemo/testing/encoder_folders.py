"""Fake audio-encoder source folders on disk (the real layouts, tiny random weights) for tests: no network here.

Qwen2.5-Omni (full or thinker-only) and Audio Flamingo 3 (whose audio tower is AF-Whisper).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def write_fake_omni_folder(folder: Path, tower: torch.nn.Module, nested: bool = True, sharded: bool = False) -> None:
    """A Qwen2.5-Omni (``nested``: thinker + talker configs, ``thinker.audio_tower.*``) or thinker-only folder
    holding ``tower``'s tensors plus unrelated LM tensors. ``sharded``: the LM tensors go to a second shard
    that is not a safetensors file, so a reader that opens it fails (proves only the tower is read)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    audio_config = tower.config.to_dict()
    prefix = "thinker.audio_tower." if nested else "audio_tower."
    lm_prefix = "thinker.model." if nested else "model."
    audio = {prefix + k: v.contiguous() for k, v in tower.state_dict().items()}
    other = {lm_prefix + "embed_tokens.weight": torch.randn(10, 4), lm_prefix + "layers.0.mlp.up_proj.weight":
             torch.randn(4, 4)}
    thinker = {"model_type": "qwen2_5_omni_thinker", "audio_config": audio_config,
               "text_config": {"model_type": "qwen2_5_omni_text", "hidden_size": 4}}
    config = ({"architectures": ["Qwen2_5OmniModel"], "model_type": "qwen2_5_omni", "thinker_config": thinker,
               "talker_config": {"model_type": "qwen2_5_omni_talker"}, "token2wav_config": {}} if nested else thinker)
    (folder / "config.json").write_text(json.dumps(config))
    if sharded:
        save_file(audio, folder / "model-00001-of-00002.safetensors")
        (folder / "model-00002-of-00002.safetensors").write_bytes(b"not a safetensors file")
        weight_map = {**{k: "model-00001-of-00002.safetensors" for k in audio},
                      **{k: "model-00002-of-00002.safetensors" for k in other}}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        save_file({**other, **audio}, folder / "model.safetensors")


def tiny_af_whisper(num_mel_bins: int = 128, dim: int = 32, window_seconds: float = 1.0) -> torch.nn.Module:
    """A tiny random AF-Whisper tower (``AudioFlamingo3Encoder``) taking windows of ``window_seconds``."""
    from transformers.models.audioflamingo3.configuration_audioflamingo3 import AudioFlamingo3EncoderConfig
    from transformers.models.audioflamingo3.modeling_audioflamingo3 import AudioFlamingo3Encoder

    positions = int(window_seconds * 50)  # 100 Hz mel -> conv stride 2 -> 50 Hz positions
    return AudioFlamingo3Encoder(AudioFlamingo3EncoderConfig(
        num_mel_bins=num_mel_bins, hidden_size=dim, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=2 * dim, max_source_positions=positions)).eval()


def write_fake_af3_folder(folder: Path, tower: torch.nn.Module) -> None:
    """A full Audio Flamingo 3 folder (``audioflamingo3``: audio_config + text_config; tensors ``audio_tower.*``,
    ``multi_modal_projector.*``, ``language_model.*``) holding ``tower``'s tensors; the non-audio tensors sit in
    a second shard that is not a safetensors file (proves only the tower is read)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    audio = {"audio_tower." + k: v.contiguous() for k, v in tower.state_dict().items()}
    other = ["multi_modal_projector.linear_1.weight", "language_model.model.embed_tokens.weight"]
    config = {"architectures": ["AudioFlamingo3ForConditionalGeneration"], "model_type": "audioflamingo3",
              "audio_config": tower.config.to_dict(), "text_config": {"model_type": "qwen2", "hidden_size": 8}}
    (folder / "config.json").write_text(json.dumps(config))
    save_file(audio, folder / "model-00001-of-00002.safetensors")
    (folder / "model-00002-of-00002.safetensors").write_bytes(b"not a safetensors file")
    weight_map = {**{k: "model-00001-of-00002.safetensors" for k in audio},
                  **{k: "model-00002-of-00002.safetensors" for k in other}}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
