"""Structured model configuration: kw-only dataclasses, validated before any work starts.

Errors name the config key to change (e.g. ``model.parallel.tensor_model_parallel_size``) so a user reading a
failed Slurm log knows what to edit.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from ualm_nemo.model.vocab import UnifiedVocab

VOCAB_PAD_MULTIPLE = 128  # fixed (not TP-dependent) so every layout sees the same padded vocabulary


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key to fix."""


@dataclass(kw_only=True)
class BackboneConfig:
    """Qwen2-shaped decoder (GQA, QKV bias, SwiGLU, RMSNorm, RoPE, untied output)."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    text_vocab_size: int  # rows of the text embedding (Qwen pads its tokenizer to this)
    norm_eps: float = 1e-6
    rope_base: float = 1_000_000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings_in_source: bool = False  # Qwen2.5 0.5B/1.5B tie; import then copies embed -> head

    @property
    def kv_channels(self) -> int:
        return self.hidden_size // self.num_attention_heads


BACKBONES: dict[str, BackboneConfig] = {
    "tiny": BackboneConfig(num_layers=4, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4,
                           num_query_groups=2, text_vocab_size=384, max_position_embeddings=4096),
    "qwen2.5-0.5b": BackboneConfig(num_layers=24, hidden_size=896, ffn_hidden_size=4864, num_attention_heads=14,
                                   num_query_groups=2, text_vocab_size=151936, tie_word_embeddings_in_source=True),
    "qwen2.5-1.5b": BackboneConfig(num_layers=28, hidden_size=1536, ffn_hidden_size=8960, num_attention_heads=12,
                                   num_query_groups=2, text_vocab_size=151936, tie_word_embeddings_in_source=True),
    "qwen2.5-7b": BackboneConfig(num_layers=28, hidden_size=3584, ffn_hidden_size=18944, num_attention_heads=28,
                                 num_query_groups=4, text_vocab_size=152064),
}


@dataclass(kw_only=True)
class AudioInputConfig:
    """Frozen audio encoder (Qwen2.5-Omni audio tower, Whisper-style, 25 Hz) + trainable adapter."""

    enabled: bool = True
    encoder_path: str | None = None  # local HF folder (Qwen2.5-Omni / Audio Flamingo 3 / encoder-only): required
    random_encoder: bool = False  # instead of encoder_path: a tiny random tower from the fields below (tests, demo)
    num_mel_bins: int = 128
    encoder_dim: int = 64  # d_model of the tiny random encoder; read from the folder when encoder_path is set
    encoder_layers: int = 2
    encoder_heads: int = 2
    adapter: Literal["linear", "mlp"] = "linear"


@dataclass(kw_only=True)
class AudioOutputConfig:
    """Codec streams and how they are predicted and weighted in the loss."""

    num_codebooks: int = 8
    codebook_size: int = 1024
    head: Literal["shared", "per_codebook"] = "shared"  # shared head + stream embedding, or MusicGen heads
    audio_stream_weight: float = 0.125
    text_weight: float = 1.0


@dataclass(kw_only=True)
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    transformer_impl: Literal["local", "transformer_engine"] = "local"
    use_distributed_optimizer: bool = True


@dataclass(kw_only=True)
class UALMConfig:
    backbone: BackboneConfig
    audio_in: AudioInputConfig = field(default_factory=AudioInputConfig)
    audio_out: AudioOutputConfig = field(default_factory=AudioOutputConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    params_dtype: Literal["fp32", "bf16"] = "fp32"
    # core attention of the local spec: megatron's DotProductAttention (materialises [b, heads, s, s]) or
    # torch's scaled_dot_product_attention (flash / memory-efficient kernels; model/sdpa_attention.py)
    attention_backend: Literal["megatron", "sdpa"] = "megatron"
    init_std: float = 0.02
    seed: int = 1234

    @property
    def vocab(self) -> UnifiedVocab:
        return UnifiedVocab(self.backbone.text_vocab_size, self.audio_out.num_codebooks, self.audio_out.codebook_size)

    @property
    def num_text_rows(self) -> int:
        """Text + UALM specials (the text table; see vocab.py)."""
        return self.vocab.audio_offset

    @property
    def num_audio_rows(self) -> int:
        return self.audio_out.num_codebooks * self.vocab.codebook_span

    def validate(self, world_size: int | None = None) -> "UALMConfig":
        b, p = self.backbone, self.parallel
        tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
        if tp < 1 or pp < 1:
            raise ConfigError("model.parallel.tensor/pipeline_model_parallel_size must be >= 1")
        if b.hidden_size % b.num_attention_heads:
            raise ConfigError(f"model.backbone.hidden_size={b.hidden_size} is not divisible by "
                              f"num_attention_heads={b.num_attention_heads}")
        if b.num_attention_heads % b.num_query_groups:
            raise ConfigError(f"model.backbone.num_attention_heads={b.num_attention_heads} is not divisible by "
                              f"num_query_groups={b.num_query_groups}")
        if b.num_attention_heads % tp:
            raise ConfigError(f"model.parallel.tensor_model_parallel_size={tp} does not divide "
                              f"num_attention_heads={b.num_attention_heads}")
        if b.num_query_groups % tp:
            raise ConfigError(f"model.parallel.tensor_model_parallel_size={tp} does not divide the "
                              f"{b.num_query_groups} KV groups (model.backbone.num_query_groups)")
        if b.ffn_hidden_size % tp:
            raise ConfigError(f"model.parallel.tensor_model_parallel_size={tp} does not divide "
                              f"ffn_hidden_size={b.ffn_hidden_size}")
        if VOCAB_PAD_MULTIPLE % tp:
            raise ConfigError(f"model.parallel.tensor_model_parallel_size={tp} must divide {VOCAB_PAD_MULTIPLE}")
        if b.num_layers % pp:
            raise ConfigError(f"model.parallel.pipeline_model_parallel_size={pp} does not divide "
                              f"num_layers={b.num_layers} (model.backbone.num_layers)")
        if p.sequence_parallel and tp == 1:
            raise ConfigError("model.parallel.sequence_parallel=true needs tensor_model_parallel_size > 1")
        if world_size is not None and world_size % (tp * pp):
            raise ConfigError(f"world size {world_size} is not divisible by tensor x pipeline parallel = {tp * pp} "
                              "(model.parallel.*): change the GPU count or the parallel sizes")
        if self.audio_out.head not in ("shared", "per_codebook"):
            raise ConfigError(f"model.audio_out.head={self.audio_out.head!r}: choose 'shared' or 'per_codebook'")
        a = self.audio_in
        if a.enabled and not a.encoder_path and not a.random_encoder:
            raise ConfigError("model.audio_in.encoder_path is not set: give the local audio encoder folder "
                              "(Qwen2.5-Omni / Audio Flamingo 3), set model.audio_in.enabled=false for a model "
                              "without audio input, or model.audio_in.random_encoder=true for a random tiny tower "
                              "(tests only)")
        if a.enabled and a.encoder_path and a.random_encoder:
            raise ConfigError("model.audio_in.random_encoder=true and encoder_path are both set: choose one")
        if self.audio_in.adapter not in ("linear", "mlp"):
            raise ConfigError(f"model.audio_in.adapter={self.audio_in.adapter!r}: choose 'linear' or 'mlp'")
        if self.attention_backend not in ("megatron", "sdpa"):
            raise ConfigError(f"model.attention_backend={self.attention_backend!r}: choose 'megatron' or 'sdpa'")
        if self.attention_backend == "sdpa" and p.transformer_impl == "transformer_engine":
            raise ConfigError("model.attention_backend=sdpa replaces the local spec's attention; Transformer Engine "
                              "brings its own fused attention: set model.attention_backend=megatron or "
                              "model.parallel.transformer_impl=local")
        if self.params_dtype not in ("fp32", "bf16"):
            raise ConfigError(f"model.params_dtype={self.params_dtype!r}: choose 'fp32' or 'bf16'")
        return self

    def with_parallel(self, **kw) -> "UALMConfig":
        return replace(self, parallel=replace(self.parallel, **kw))


def padded(n: int, multiple: int = VOCAB_PAD_MULTIPLE) -> int:
    return -(-n // multiple) * multiple
