"""Structured model configuration: kw-only dataclasses, validated before any work starts.

Errors name the config key to change (e.g. ``model.parallel.tensor_model_parallel_size``) so a user reading a
failed Slurm log knows what to edit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, Mapping

from ualm_nemo.config_types import ConfigError, build_section
from ualm_nemo.model.vocab import UnifiedVocab

VOCAB_PAD_MULTIPLE = 128  # fixed (not TP-dependent) so every layout sees the same padded vocabulary


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
    context_parallel_size: int = 1  # validated; the build refuses > 1 for now (no per-CP-rank sequence split)
    virtual_pipeline_model_parallel_size: int | None = None  # model chunks per PP rank (interleaved schedule)
    overlap_grad_reduce: bool = False  # DDP: grad all-reduce / reduce-scatter in buckets during the backward
    overlap_param_gather: bool = False  # distributed optimizer: param all-gather during the next forward
    grad_reduce_in_bf16: bool = False  # bf16 params: reduce grads in bf16 (default: an fp32 grad buffer)

    @property
    def model_parallel_size(self) -> int:
        """Ranks of one model replica: TP x PP x CP (the data-parallel size is the world over this)."""
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // self.model_parallel_size


@dataclass(kw_only=True)
class RecomputeConfig:
    """Activation recompute (megatron's recompute_granularity / recompute_method / recompute_num_layers).

    ``selective`` recomputes the ``modules`` of every layer (core attention: the [b, heads, s, s] scores);
    ``full`` recomputes whole layers: ``method=uniform`` checkpoints units of ``num_layers`` layers (1: every
    layer), ``method=block`` the first ``num_layers`` layers of each pipeline stage.
    """

    granularity: Literal["selective", "full"] | None = None  # null: no recompute
    method: Literal["uniform", "block"] | None = None  # full only (null: uniform)
    num_layers: int | None = None  # full only (null: 1 with uniform, every layer of a stage with block)
    modules: list[str] = field(default_factory=lambda: ["core_attn"])  # selective only: core_attn and/or mlp


@dataclass(kw_only=True)
class FP8Config:
    """FP8 GEMMs of the decoder layers through Transformer Engine (megatron's fp8 / fp8_recipe / fp8_margin /
    fp8_amax_history_len / fp8_amax_compute_algo).

    Only the decoder's TE linear layers run in FP8: the text/audio embeddings and the output heads are megatron's
    VocabParallelEmbedding / ColumnParallelLinear (not TE), so they stay in the params dtype (bf16) always.
    """

    enabled: bool = False
    format: Literal["hybrid", "e4m3"] = "hybrid"  # hybrid: e4m3 forward, e5m2 gradients
    recipe: Literal["delayed", "tensorwise", "mxfp8", "blockwise"] = "delayed"  # mxfp8: Blackwell GPUs only
    margin: int = 0
    amax_history_len: int = 1024  # delayed scaling's amax window
    amax_compute_algo: Literal["max", "most_recent"] = "max"
    bf16_layers_at_ends: int = 0  # first and last N decoder layers kept in bf16 (not with recipe=delayed)


RECOMPUTE_MODULES = ("core_attn", "mlp")


@dataclass(kw_only=True)
class UALMConfig:
    backbone: BackboneConfig
    audio_in: AudioInputConfig = field(default_factory=AudioInputConfig)
    audio_out: AudioOutputConfig = field(default_factory=AudioOutputConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    recompute: RecomputeConfig = field(default_factory=RecomputeConfig)
    fp8: FP8Config = field(default_factory=FP8Config)
    params_dtype: Literal["fp32", "bf16"] = "fp32"
    # core attention of the local spec: megatron's DotProductAttention (materialises [b, heads, s, s]) or
    # torch's scaled_dot_product_attention (flash / memory-efficient kernels; model/sdpa_attention.py)
    attention_backend: Literal["megatron", "sdpa"] = "megatron"
    init_std: float = 0.02
    seed: int = 1234

    @classmethod
    def from_dict(cls, section: Mapping[str, Any]) -> "UALMConfig":
        """The ``model`` section of a run (or a stored ``ualm_config``): ``backbone`` a name of BACKBONES or its
        fields (optionally on a ``base``); unknown keys and mistyped values raise ConfigError naming
        ``model.<key>``. Checkpoints, converters and the run config all parse a model config here."""
        section = dict(section)
        backbone = section.pop("backbone", "tiny")
        if isinstance(backbone, str):
            if backbone not in BACKBONES:
                raise ConfigError(f"model.backbone={backbone!r}: choose one of {sorted(BACKBONES)} or give the "
                                  "fields")
            backbone_cfg = BACKBONES[backbone]
        else:
            backbone = dict(backbone)
            base = backbone.pop("base", None)
            backbone_cfg = build_section(BackboneConfig, {**(asdict(BACKBONES[base]) if base else {}), **backbone},
                                         "model.backbone")
        parts = {"audio_in": AudioInputConfig, "audio_out": AudioOutputConfig, "parallel": ParallelConfig,
                 "recompute": RecomputeConfig, "fp8": FP8Config}
        built = {name: build_section(part, section.pop(name, None), f"model.{name}") for name, part in parts.items()}
        return build_section(cls, {"backbone": backbone_cfg, **built, **section}, "model")

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
        if world_size is not None and world_size % p.model_parallel_size:
            raise ConfigError(f"world size {world_size} is not divisible by tensor x pipeline x context parallel = "
                              f"{p.model_parallel_size} (model.parallel.*): change the GPU count or the parallel sizes")
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
        _validate_parallel_features(self)
        _validate_recompute(self)
        _validate_fp8(self)
        return self

    def with_parallel(self, **kw) -> "UALMConfig":
        return replace(self, parallel=replace(self.parallel, **kw))

    def without_training_features(self) -> "UALMConfig":
        """Recompute, FP8, CP, VPP and the DDP overlap options off: a trained model's config for inference and
        conversion, which rebuild it on the local spec at another layout."""
        return replace(self, recompute=RecomputeConfig(), fp8=FP8Config(), parallel=replace(
            self.parallel, context_parallel_size=1, virtual_pipeline_model_parallel_size=None,
            overlap_grad_reduce=False, overlap_param_gather=False, grad_reduce_in_bf16=False))


def _validate_parallel_features(cfg: UALMConfig) -> None:
    p, layers = cfg.parallel, cfg.backbone.num_layers
    pp, cp, vpp = p.pipeline_model_parallel_size, p.context_parallel_size, p.virtual_pipeline_model_parallel_size
    if cp < 1:
        raise ConfigError(f"model.parallel.context_parallel_size={cp} must be >= 1")
    if cp > 1 and p.transformer_impl != "transformer_engine":
        raise ConfigError(f"model.parallel.context_parallel_size={cp} needs Transformer Engine's attention (ring "
                          "exchange of K/V): set model.parallel.transformer_impl=transformer_engine")
    if vpp is not None:
        if vpp < 2:
            raise ConfigError(f"model.parallel.virtual_pipeline_model_parallel_size={vpp} must be >= 2 (or null)")
        if pp < 2:
            raise ConfigError(f"model.parallel.virtual_pipeline_model_parallel_size={vpp} interleaves pipeline "
                              "stages: it needs model.parallel.pipeline_model_parallel_size > 1")
        if layers % (pp * vpp):
            raise ConfigError(f"model.parallel.virtual_pipeline_model_parallel_size={vpp} x pipeline_model_parallel"
                              f"_size={pp} does not divide num_layers={layers} (model.backbone.num_layers)")
    if p.overlap_param_gather and not p.use_distributed_optimizer:
        raise ConfigError("model.parallel.overlap_param_gather=true overlaps the distributed optimizer's param "
                          "all-gather: it needs model.parallel.use_distributed_optimizer=true")
    if p.overlap_param_gather and not p.overlap_grad_reduce:
        raise ConfigError("model.parallel.overlap_param_gather=true needs model.parallel.overlap_grad_reduce=true "
                          "(megatron overlaps the param all-gather only together with the grad reduce-scatter)")
    if p.grad_reduce_in_bf16 and cfg.params_dtype != "bf16":
        raise ConfigError("model.parallel.grad_reduce_in_bf16=true reduces grads in the params dtype: it needs "
                          f"model.params_dtype=bf16 (is {cfg.params_dtype!r}; fp32 params reduce in fp32)")


def layers_per_chunk(cfg: UALMConfig) -> int:
    """Decoder layers of one model chunk: a pipeline stage, or one virtual stage of it under VPP."""
    p = cfg.parallel
    return cfg.backbone.num_layers // (p.pipeline_model_parallel_size * (p.virtual_pipeline_model_parallel_size or 1))


def _validate_recompute(cfg: UALMConfig) -> None:
    r = cfg.recompute
    per_stage = layers_per_chunk(cfg)
    if r.granularity not in (None, "selective", "full"):
        raise ConfigError(f"model.recompute.granularity={r.granularity!r}: choose null, 'selective' or 'full'")
    if r.method not in (None, "uniform", "block"):
        raise ConfigError(f"model.recompute.method={r.method!r}: choose null, 'uniform' or 'block'")
    if r.granularity != "full" and (r.method is not None or r.num_layers is not None):
        raise ConfigError(f"model.recompute.method / num_layers choose the layers of granularity=full; with "
                          f"granularity={r.granularity!r} set both to null")
    if r.granularity == "full" and r.num_layers is not None and not 1 <= r.num_layers <= per_stage:
        raise ConfigError(f"model.recompute.num_layers={r.num_layers} must lie in [1, {per_stage}] (the layers of "
                          "one model chunk: a pipeline stage, or a virtual stage under VPP)")
    bad = sorted(set(r.modules) - set(RECOMPUTE_MODULES))
    if bad or not r.modules:
        raise ConfigError(f"model.recompute.modules={list(r.modules)}: choose from {list(RECOMPUTE_MODULES)}")


def _validate_fp8(cfg: UALMConfig) -> None:
    """The shape of an FP8 run. Whether Transformer Engine imports is checked where the model is built (and by
    the launcher only when no container image is given): the submitting host may lack TE while the job's
    container has it."""
    f, b, tp = cfg.fp8, cfg.backbone, cfg.parallel.tensor_model_parallel_size
    if not f.enabled:
        return
    if cfg.parallel.transformer_impl != "transformer_engine":
        raise ConfigError("model.fp8.enabled=true runs the decoder's GEMMs in Transformer Engine's FP8: set "
                          "model.parallel.transformer_impl=transformer_engine (the local spec has no FP8)")
    if cfg.params_dtype != "bf16":
        raise ConfigError("model.fp8.enabled=true needs model.params_dtype=bf16 (FP8 GEMMs with bf16 weights; the "
                          "embeddings and output heads stay bf16)")
    if f.margin < 0 or f.amax_history_len < 1:
        raise ConfigError(f"model.fp8.margin={f.margin} must be >= 0 and model.fp8.amax_history_len="
                          f"{f.amax_history_len} >= 1")
    for name, dim in (("hidden_size", b.hidden_size), ("ffn_hidden_size / TP", b.ffn_hidden_size // tp)):
        if dim % 16:
            raise ConfigError(f"model.fp8.enabled=true: FP8 GEMMs need dimensions divisible by 16, "
                              f"model.backbone.{name}={dim} is not")
    per_stage = b.num_layers // cfg.parallel.pipeline_model_parallel_size
    if f.bf16_layers_at_ends:
        if f.recipe == "delayed":
            raise ConfigError("model.fp8.bf16_layers_at_ends needs a current-scaling recipe: megatron's delayed "
                              "scaling cannot keep layers in bf16 (set model.fp8.recipe=tensorwise)")
        if not 0 < f.bf16_layers_at_ends <= per_stage:
            raise ConfigError(f"model.fp8.bf16_layers_at_ends={f.bf16_layers_at_ends} must lie in [0, {per_stage}] "
                              "(the layers of one pipeline stage)")


def padded(n: int, multiple: int = VOCAB_PAD_MULTIPLE) -> int:
    return -(-n // multiple) * multiple


def check_same_model(stored: UALMConfig, given: UALMConfig) -> None:
    """Raise ConfigError if two configs describe different weights (layout, dtype and paths may differ)."""
    diffs = []
    for section in ("backbone", "audio_out"):
        a, b = asdict(getattr(stored, section)), asdict(getattr(given, section))
        diffs += [f"model.{section}.{k}: checkpoint {a[k]!r} != given {b[k]!r}" for k in a
                  if a[k] != b[k] and k != "tie_word_embeddings_in_source"]
    a, b = stored.audio_in, given.audio_in
    for k in ("enabled", "adapter"):
        if getattr(a, k) != getattr(b, k):
            diffs.append(f"model.audio_in.{k}: checkpoint {getattr(a, k)!r} != given {getattr(b, k)!r}")
    if diffs:
        raise ConfigError("the given model config does not match the checkpoint's: " + "; ".join(diffs))
