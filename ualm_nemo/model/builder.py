"""Builds the Megatron TransformerConfig, the layer spec and the model chunks of this pipeline rank."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from ualm_nemo.model.config import ConfigError, UALMConfig, layers_per_chunk
from ualm_nemo.model.ualm import UALMLanguageModel

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def transformer_config(cfg: UALMConfig, perform_initialization: bool = True) -> TransformerConfig:
    """Qwen2 block in Megatron terms: GQA, QKV bias, no other biases, SwiGLU, RMSNorm.

    ``perform_initialization=False`` leaves Megatron's layers (decoder, embedding and head tables) allocated but
    not initialised (``torch.empty``) and skips the full fp32 master weight Megatron's CPU initialisation builds
    per layer: for converters, which overwrite every such tensor (HF weights or a checkpoint load). Parameters
    that UALM initialises itself (stream embedding / codebook heads, audio adapter) are initialised either way.
    """
    b, p = cfg.backbone, cfg.parallel
    dtype = _DTYPES[cfg.params_dtype]
    on_gpu = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=b.num_layers, hidden_size=b.hidden_size, ffn_hidden_size=b.ffn_hidden_size,
        num_attention_heads=b.num_attention_heads, num_query_groups=b.num_query_groups, kv_channels=b.kv_channels,
        add_qkv_bias=True, add_bias_linear=False, gated_linear_unit=True, activation_func=F.silu,
        normalization="RMSNorm", layernorm_epsilon=b.norm_eps, init_method_std=cfg.init_std,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size, sequence_parallel=p.sequence_parallel,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=cfg.params_dtype == "bf16",
        hidden_dropout=0.0, attention_dropout=0.0, calculate_per_token_loss=True, variable_seq_lengths=True,
        moe_token_dispatcher_type="alltoall",  # no MoE; the default dispatcher rejects variable_seq_lengths
        # CPU-initialised master weights: the same seed gives the same weights at every TP size
        use_cpu_initialization=True, perform_initialization=perform_initialization,
        # fused kernels only where Transformer Engine provides them; the local spec stays plain torch
        bias_dropout_fusion=on_gpu, apply_rope_fusion=False,
        masked_softmax_fusion=on_gpu and p.transformer_impl == "transformer_engine",
        gradient_accumulation_fusion=False, persist_layer_norm=False,
        context_parallel_size=p.context_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        **_interleaving_fields(cfg),
        **_recompute_fields(cfg), **_fp8_fields(cfg),
    )


def _interleaving_fields(cfg: UALMConfig) -> dict:
    """VPP: activations and gradients in separate point-to-point calls, issued in even / odd rank order
    (megatron's overlap_p2p_comm, what Megatron-LM runs with VPP). The default batched exchange sends both
    directions in one call; at PP2 the previous and the next stage are the same rank and its sends meet the
    wrong receives (measured on gloo: the first interleaved step hung)."""
    if cfg.parallel.virtual_pipeline_model_parallel_size is None:
        return {}
    return {"overlap_p2p_comm": True, "batch_p2p_comm": False}


def _recompute_fields(cfg: UALMConfig) -> dict:
    """model.recompute -> megatron's recompute_* (validated in config.py)."""
    r = cfg.recompute
    if r.granularity is None:
        return {}
    if r.granularity == "selective":
        return {"recompute_granularity": "selective", "recompute_modules": list(r.modules)}
    method = r.method or "uniform"
    num_layers = r.num_layers or (1 if method == "uniform" else layers_per_chunk(cfg))
    return {"recompute_granularity": "full", "recompute_method": method, "recompute_num_layers": num_layers}


def _fp8_fields(cfg: UALMConfig) -> dict:
    """model.fp8 -> megatron's fp8 fields. The embeddings and output heads are not TE layers: never FP8."""
    f = cfg.fp8
    if not f.enabled:
        return {}
    ends = f.bf16_layers_at_ends
    return {"fp8": f.format, "fp8_recipe": f.recipe, "fp8_margin": f.margin,
            "fp8_amax_history_len": f.amax_history_len, "fp8_amax_compute_algo": f.amax_compute_algo,
            "first_last_layers_bf16": ends > 0, "num_layers_at_start_in_bf16": max(ends, 1),
            "num_layers_at_end_in_bf16": max(ends, 1)}


def check_buildable(cfg: UALMConfig, check_imports: bool = True) -> None:
    """What a validated config still cannot build: features not wired yet and, with ``check_imports``,
    Transformer Engine missing for model.fp8 / transformer_impl=transformer_engine.

    build_model calls it on the machine (container) that trains. The launcher passes ``check_imports`` only when
    no container image is given (launcher/validate.py): a submitting host may lack TE while the job's image has it.
    """
    p = cfg.parallel
    if p.context_parallel_size > 1:
        raise ConfigError(f"model.parallel.context_parallel_size={p.context_parallel_size} is not supported yet: "
                          "the model does not split each sequence per CP rank (after the audio splice) nor reduce "
                          "the loss over CP; set it to 1")
    if not check_imports or not (cfg.fp8.enabled or p.transformer_impl == "transformer_engine"):
        return
    key = "model.fp8.enabled=true" if cfg.fp8.enabled else "model.parallel.transformer_impl=transformer_engine"
    try:
        import transformer_engine  # noqa: F401
    except ImportError as err:
        raise ConfigError(f"{key} needs Transformer Engine, which does not import here: pip install '.[gpu]' "
                          "(transformer-engine) or run in the NGC PyTorch container (--container-image)") from err
    if cfg.fp8.enabled and cfg.fp8.recipe == "mxfp8" and torch.cuda.is_available() \
            and torch.cuda.get_device_capability()[0] < 10:
        raise ConfigError("model.fp8.recipe=mxfp8 needs a Blackwell GPU (compute capability 10+): choose delayed, "
                          "tensorwise or blockwise")


def layer_spec(cfg: UALMConfig) -> ModuleSpec:
    """Local (pure torch) spec on CPU, Transformer Engine spec on GPU when configured and installed.

    ``model.attention_backend=sdpa``: the local spec with its core attention on torch's SDPA (sdpa_attention.py).
    """
    from megatron.core.models.gpt import gpt_layer_specs

    if cfg.parallel.transformer_impl == "transformer_engine":
        try:
            import transformer_engine  # noqa: F401
        except ImportError as err:
            raise ConfigError("model.parallel.transformer_impl=transformer_engine but transformer_engine is not "
                              "installed (pip install '.[gpu]' or use the NGC container)") from err
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    return with_sdpa_attention(spec) if cfg.attention_backend == "sdpa" else spec


def with_sdpa_attention(spec: ModuleSpec) -> ModuleSpec:
    """A copy of the layer ``spec`` whose self-attention's core attention is ``SDPAAttention`` (spec untouched)."""
    from ualm_nemo.model.sdpa_attention import SDPAAttention

    attention = spec.submodules.self_attention
    core = dataclasses.replace(attention.submodules, core_attention=SDPAAttention)
    return dataclasses.replace(spec, submodules=dataclasses.replace(
        spec.submodules, self_attention=dataclasses.replace(attention, submodules=core)))


def build_model(cfg: UALMConfig, pre_process: bool | None = None, post_process: bool | None = None,
                initialize: bool = True, device: str | None = None, vp_stage: int | None = None
                ) -> UALMLanguageModel:
    """The model chunk of this rank's pipeline stage, or of its virtual stage ``vp_stage`` under
    model.parallel.virtual_pipeline_model_parallel_size (parallel_state must be initialised).

    A virtual stage holds the global layers megatron's TransformerBlock assigns to (pp rank, vp_stage): with PP2 x
    VPP2 and 8 layers, rank 0 holds 0-1 (chunk 0) and 4-5 (chunk 1), rank 1 holds 2-3 and 6-7; the embeddings
    live on chunk 0 of the first rank, the heads on the last chunk of the last rank.
    ``initialize=False``: see ``transformer_config(perform_initialization=False)``; for weights that are all
    overwritten before use (conversion). ``device``: ``"cpu"`` keeps the model on the CPU where a GPU is
    present (converters); default: the current GPU when there is one.
    """
    groups = ProcessGroupCollection.use_mpu_process_groups()  # read once, then passed to every parallel part
    cfg.validate(groups.tp.size() * groups.pp.size() * groups.cp.size())
    check_buildable(cfg)
    vpp = cfg.parallel.virtual_pipeline_model_parallel_size
    if (vpp is None) != (vp_stage is None) or (vp_stage is not None and not 0 <= vp_stage < vpp):
        raise ValueError(f"vp_stage={vp_stage} for model.parallel.virtual_pipeline_model_parallel_size={vpp}: give "
                         "one stage in [0, VPP) exactly when VPP is set (build_model_chunks builds them all)")
    if pre_process is None:
        pre_process = groups.pp.rank() == 0 and vp_stage in (None, 0)
    if post_process is None:
        post_process = groups.pp.rank() == groups.pp.size() - 1 and vp_stage in (None, (vpp or 1) - 1)
    model = UALMLanguageModel(transformer_config(cfg, initialize), cfg, layer_spec(cfg), pre_process, post_process,
                              pg_collection=groups, vp_stage=vp_stage)
    if not initialize:
        set_missing_tp_attributes(model)
    if device is None and torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    elif device not in (None, "cpu"):
        model.to(device)
    return model


def build_model_chunks(cfg: UALMConfig, initialize: bool = True) -> list[UALMLanguageModel]:
    """Every model chunk of this pipeline rank, in schedule order: one, or one per virtual stage under VPP.

    The interleaved schedule is chosen from megatron's parallel_state, the chunks from ``cfg``: both must agree
    (init_model_parallel with this config's model.parallel), or the schedule would run chunks it was not built for.
    """
    from megatron.core import parallel_state

    vpp = cfg.parallel.virtual_pipeline_model_parallel_size
    initialised = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    if initialised != vpp:
        raise ValueError(f"model.parallel.virtual_pipeline_model_parallel_size={vpp}, but parallel_state was "
                         f"initialised with {initialised}: call init_model_parallel with this config's parallel")
    if vpp is None:
        return [build_model(cfg, initialize=initialize)]
    return [build_model(cfg, initialize=initialize, vp_stage=stage) for stage in range(vpp)]


def set_missing_tp_attributes(model: torch.nn.Module) -> None:
    """Give Megatron's parallel layers the tensor-parallel attributes their weights get when initialised.

    megatron-core 0.16.1 sets ``tensor_model_parallel`` / ``partition_dim`` / ``partition_stride`` on a weight
    inside its initialisation helpers only, so ``perform_initialization=False`` leaves them unset; the optimizer's
    grad norm then counts TP-sharded weights as duplicates on TP ranks > 0 (measured: a resume built without
    initialisation diverged from step 2 at TP2). tests/distributed/test_mcore_patches.py guards both facts.
    """
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    gated = bool(getattr(model.config, "gated_linear_unit", False))
    for name, module in model.named_modules():
        if not isinstance(module, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)):
            continue
        weight = getattr(module, "weight", None)
        if weight is None or hasattr(weight, "tensor_model_parallel"):
            continue
        # megatron's MLP builds a gated fc1 with stride 2 ([gate, up] interleaved per TP rank); all else stride 1
        stride = 2 if gated and name.endswith("mlp.linear_fc1") else 1
        set_tensor_model_parallel_attributes(weight, is_parallel=True, dim=1 if isinstance(module, RowParallelLinear)
                                             else 0, stride=stride)

