"""Know the cost before submitting: parameters per rank, memory per GPU, FLOPs per step, the wall-clock and the
checkpoint interval that loses the least time to failures (launcher/failures.py).

    python -m launcher.plan --cluster dgx-h100 --nodes 2 -- model=qwen2.5-7b data=pretrain_blend ...
    python -m launcher.plan ... --recompute selective --mfu 0.35 --gpu h200 --json

The arguments are those of ``python -m launcher.submit`` (the cluster flags, then ``--`` and Hydra overrides of
conf/train.yaml), composed and layout-checked the same way; input paths need not exist, and ``???`` values the
user did not give are filled with a placeholder for the plan only (listed in the output). The arithmetic is in
pure functions below, each stating its formula; tests/launcher/test_plan.py checks the parameter counts against
real models (TP1, TP2, PP2) and the optimizer formula against Megatron's allocated buffers.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from launcher.failures import LLAMA3_FAILURES_PER_GPU_DAY, checkpoint_bytes, plan_failures, render_failures
from ualm_nemo.data.shar_config import SharLoaderConfig
from ualm_nemo.model.config import BackboneConfig, ConfigError, UALMConfig, padded
from ualm_nemo.model.flops import GPUS, flops_per_token  # shared with the training log's TFLOP/s and MFU
from ualm_nemo.training.stages import is_trainable

PLACEHOLDER = "/plan/placeholder"  # what a '???' value becomes for planning (never opened)
RECOMPUTE = ("none", "selective", "full")
GiB = 2**30


@dataclass(frozen=True)
class Part:
    """One component's parameters: ``sharded`` elements are split over TP, ``replicated`` ones are on every TP
    rank. ``where``: "first"/"last" pipeline stage, or "layer" (counts of one decoder layer). ``name`` is a
    parameter name of the real model (what ``training.stages.is_trainable`` decides on)."""

    label: str
    name: str
    where: str
    sharded: int = 0
    replicated: int = 0
    norms: bool = False  # the replicated elements are RMSNorm weights (fp32 under the local spec, see state_bytes)
    rows: int = 0  # vocab tables: rows (split over TP in contiguous blocks)
    special: tuple[int, int] = (0, 0)  # vocab tables: (first row, count) of the UALM specials


def backbone_parameters(b: BackboneConfig, tied: bool = False) -> int:
    """The Hugging Face Qwen2 model's parameter count: embed V*h + L*layer + final norm h (+ head V*h untied).

    layer = q (a*d*h + a*d) + k, v (g*d*h + g*d each) + o (h*a*d) + SwiGLU 3*f*h + 2 RMSNorm h; d = h / a.
    Checks the arithmetic against published figures (Qwen2.5-0.5B: 494,032,768 with tied embeddings).
    """
    h, d, a, g, f = b.hidden_size, b.kv_channels, b.num_attention_heads, b.num_query_groups, b.ffn_hidden_size
    layer = (a + 2 * g) * d * (h + 1) + h * a * d + 3 * f * h + 2 * h
    return b.text_vocab_size * h * (1 if tied else 2) + b.num_layers * layer + h


def parameter_counts(cfg: UALMConfig, encoder_params: int, encoder_dim: int) -> list[Part]:
    """Every parameter of UALMLanguageModel, as the builder makes it (ualm.py, embedding.py, heads.py).

    * text / audio embedding and head tables: padded(rows) x h, rows padded to VOCAB_PAD_MULTIPLE, split over TP;
      text rows = Qwen text ids + 4 specials, audio rows = N codebooks x (codebook_size + 1);
    * decoder layer (Megatron GPT layer, Qwen2 shape): QKV (a + 2g) d (h + 1) (bias), proj h a d, fc1 2 f h (gate +
      up), fc2 f h, all split over TP; 2 RMSNorm weights h, replicated; final RMSNorm h on the last stage;
    * stream heads: shared -> stream embedding (N-1) x h; per_codebook -> (N-1) x (codebook_size + 1) x h,
      replicated over TP;
    * audio input (first stage, replicated): the frozen encoder (``encoder_params``, counted from its config) and
      the adapter: Linear(encoder_dim, h) (+ Linear(h, h) for ``mlp``), with biases.
    """
    b, out = cfg.backbone, cfg.audio_out
    h, d, a, g, f = b.hidden_size, b.kv_channels, b.num_attention_heads, b.num_query_groups, b.ffn_hidden_size
    text_rows, audio_rows = padded(cfg.num_text_rows), padded(cfg.num_audio_rows)
    extra, span = out.num_codebooks - 1, cfg.vocab.codebook_span
    specials = (b.text_vocab_size, cfg.num_text_rows - b.text_vocab_size)
    parts = [Part("text embedding", "embedding.text.weight", "first", sharded=text_rows * h, rows=text_rows,
                  special=specials),
             Part("audio embedding", "embedding.audio.weight", "first", sharded=audio_rows * h)]
    if cfg.audio_in.enabled:
        adapter = encoder_dim * h + h + ((h * h + h) if cfg.audio_in.adapter == "mlp" else 0)
        parts += [Part("audio encoder (frozen)", "audio_input.encoder.tower", "first", replicated=encoder_params),
                  Part("audio adapter", "audio_input.adapter.fc1.weight", "first", replicated=adapter)]
    parts += [Part("decoder layers", "decoder.layers.0.mlp.linear_fc1.weight", "layer",
                   sharded=(a + 2 * g) * d * (h + 1) + h * a * d + 3 * f * h, replicated=2 * h, norms=True),
              Part("final norm", "decoder.final_layernorm.weight", "last", replicated=h, norms=True),
              Part("text head", "heads.text_head.weight", "last", sharded=text_rows * h, rows=text_rows,
                   special=specials),
              Part("audio head", "heads.audio_head.weight", "last", sharded=audio_rows * h)]
    if out.head == "shared":
        parts.append(Part("stream embedding", "heads.stream_embedding", "last", replicated=extra * h))
    else:
        parts.append(Part("codebook heads", "heads.codebook_heads", "last", replicated=extra * span * h))
    return parts


def model_total(parts: list[Part], num_layers: int) -> int:
    """All parameters of the whole model (every TP shard once): sum of parts, a layer counted L times."""
    return sum((p.sharded + p.replicated) * (num_layers if p.where == "layer" else 1) for p in parts)


def _special_rows_only(train_stage: str, name: str) -> bool:
    from ualm_nemo.training import stages

    rule = getattr(stages, "special_rows_only", None)  # align: only the specials' rows of the text tables train
    return bool(rule and rule(train_stage, name))


def per_rank_parameters(parts: list[Part], num_layers: int, tp: int, pp: int, stage: int,
                        train_stage: str = "pretrain", tp_rank: int = 0) -> dict[str, Any]:
    """Parameters held by one rank of pipeline stage ``stage``: sharded / tp + replicated per part, L / pp decoder
    layers, the first stage's and the last stage's parts. Trainable or frozen as ``train_stage`` decides
    (training.stages); a table of which only the special rows train (align) counts those rows of TP rank
    ``tp_rank`` as trainable but has gradients and optimizer state for all its rows ("with_grad", what memory
    follows). Returns {"trainable", "frozen", "total", "with_grad", "trainable_norms" / "frozen_norms" (RMSNorm
    weights among the parameters with / without gradients), "parts": {label: numel}}."""
    counts: dict[str, int] = {}
    trainable = frozen = norms = frozen_norms = with_grad = 0
    for p in parts:
        if p.where == "layer":
            n = num_layers // pp * (p.sharded // tp + p.replicated)
        elif (p.where == "first" and stage == 0) or (p.where == "last" and stage == pp - 1):
            n = p.sharded // tp + p.replicated
        else:
            continue
        counts[p.label] = n
        if _special_rows_only(train_stage, p.name):
            local = p.rows // tp
            first, count = p.special
            mine = max(0, min(first + count, (tp_rank + 1) * local) - max(first, tp_rank * local))
            trainable += mine * (p.sharded // p.rows)
            frozen += n - mine * (p.sharded // p.rows)
            with_grad += n
        elif is_trainable(train_stage, p.name):
            trainable += n
            with_grad += n
        else:
            frozen += n
        if p.norms:
            count = p.replicated * (num_layers // pp if p.where == "layer" else 1)
            norms, frozen_norms = (norms + count, frozen_norms) if is_trainable(train_stage, p.name) \
                else (norms, frozen_norms + count)
    return {"trainable": trainable, "frozen": frozen, "total": trainable + frozen, "with_grad": with_grad,
            "trainable_norms": norms,
            "frozen_norms": frozen_norms, "parts": counts}


def state_bytes(trainable: int, frozen: int, params_dtype: str, dp: int, distributed_optimizer: bool,
                fp32_trainable: int = 0, fp32_frozen: int = 0, grad_bytes: float = 4.0) -> dict[str, float]:
    """Weights, gradients and optimizer states of one rank, in bytes (Megatron DDP + optimizer, megatron-core
    0.16.1, as ualm_nemo.distributed.optim configures them).

    * weights: 2 bytes (bf16) or 4 (fp32) per parameter, trainable and frozen (the encoder is cast too);
    * grads: ``grad_bytes`` per trainable parameter (4: fp32 grad buffer; 2 with model.parallel.grad_reduce_in_bf16
      in a bf16 model; frozen ones have none);
    * optimizer: bf16 -> fp32 master copy + Adam m and v = 12 per trainable parameter; fp32 -> m and v = 8
      (the master is the weight itself). The distributed optimizer shards this part over DP (``/ dp``); the
      grad buffer stays whole on every rank. So bf16: 18 bytes/param without, 6 + 12/DP with it.
    * ``fp32_trainable`` / ``fp32_frozen`` of the parameters stay fp32 in a bf16 model: the local spec's torch
      RMSNorm weights (Megatron casts them only through its Float16Module, which ualm_nemo does not use;
      Transformer Engine's norms follow params_dtype): 4 + 4 + 8 bytes each when trainable, 4 when frozen.
    Bucket padding (to a multiple of lcm(DP, 128) elements, params 64-aligned) is left out: < 0.1 % at 7B.
    """
    if params_dtype != "bf16":
        fp32_trainable, fp32_frozen = trainable, frozen
    low = trainable - fp32_trainable  # bf16 trainable parameters
    return {"weights": 2.0 * (low + frozen - fp32_frozen) + 4.0 * (fp32_trainable + fp32_frozen),
            "grads": grad_bytes * trainable,
            "optimizer": (12 * low + 8 * fp32_trainable) / (dp if distributed_optimizer else 1)}


def layer_activation_bytes(b: BackboneConfig, seq_len: int, tp: int, sequence_parallel: bool, attention: str,
                           recompute: str) -> float:
    """Bytes one decoder layer keeps for backward per token (position), bf16 activations.

    Korthikanti et al. 2022 ("Reducing Activation Recomputation"): s b h (34 + 5 a s / h) per layer, for MHA, a
    4h GeLU MLP and dropout. Re-derived for the Qwen2 layer here, per token (x s b for a micro-batch):
    * replicated over TP unless sequence parallel: the two RMSNorm inputs 4h, the QKV and fc1 inputs 2h + 2h;
    * split over TP: Q, K, V 2 (h + 2 kv) with kv = g d (grouped-query attention) under Transformer Engine's
      fused attention (``attention="te"``), kv = h with the local spec (``"local"``, ``"sdpa"``: K, V expanded to
      every head); the proj input 2h; SwiGLU: the fc1 output 4f (gate and up) and the fc2 input 2f;
    * the attention scores: softmax output 2 a s with the local (unfused) attention, none with fused kernels
      (TE, or torch SDPA's flash / memory-efficient kernels on GPU); dropout is 0 here, so no masks.
    Selective recompute drops the scores term (Megatron's core_attn recompute); full recompute keeps only the
    layer input 2h (/ tp with sequence parallel); the one layer being recomputed is added by the caller.
    """
    h, g, f, a = b.hidden_size, b.num_query_groups * b.kv_channels, b.ffn_hidden_size, b.num_attention_heads
    if recompute == "full":
        return 2 * h / (tp if sequence_parallel else 1)
    kv = g if attention == "te" else h
    scores = 0 if (attention != "local" or recompute == "selective") else 2 * a * seq_len
    replicated = 4 * h + 4 * h
    split = 2 * (h + 2 * kv) + 2 * h + 6 * f + scores
    return (replicated / tp if sequence_parallel else replicated) + split / tp


def head_activation_bytes(cfg: UALMConfig, tp: int) -> float:
    """Bytes the stream heads keep per token on the last stage (heads.py), counted generously.

    Stream 0 over the whole unified vocabulary, this rank's (padded text + padded audio) / tp columns: the bf16
    logits and the fp32 copy the vocab-parallel cross-entropy keeps (6 bytes per column). Streams 1..N-1 over
    their codebook (codebook_size + 1 columns): bf16 logits + fp32 log-softmax (6 per column), and the
    per-stream hidden input (N-1) x h in bf16. The final norm input and the head input add 4h.
    """
    h, extra, span = cfg.backbone.hidden_size, cfg.audio_out.num_codebooks - 1, cfg.vocab.codebook_span
    columns = (padded(cfg.num_text_rows) + padded(cfg.num_audio_rows)) / tp
    return 6 * columns + 6 * extra * span + 2 * extra * h + 4 * h


@dataclass(frozen=True)
class Batch:
    """Positions of one micro-batch (upper bound: every row full, padding included) and per step."""

    rows: int  # rows per micro-batch
    seq_len: int  # positions per row
    micro_batches: int  # per step, all data-parallel ranks together (global_batch_size / micro_batch_size)
    per_rank: int  # micro-batches per step on one data-parallel rank

    @property
    def tokens_per_micro(self) -> int:
        return self.rows * self.seq_len

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batches * self.tokens_per_micro


def batch_shape(global_batch: int, micro_batch: int, dp: int, seq_len: int, shar: SharLoaderConfig | None) -> Batch:
    """Manifests: micro_batch_size rows of at most data.seq_len. Shar: a token budget of data.shar.max_tokens
    positions per micro-batch, packed rows of data.shar.seq_len (max_tokens // seq_len rows; unpacked: one
    budget, rows of at most seq_len). Micro-batches per step = global / micro either way."""
    if shar is not None:
        seq, max_tokens = shar.seq_len, shar.max_tokens
        seq = min(seq, max_tokens)
        rows = max(1, max_tokens // seq)
    else:
        seq, rows = seq_len, micro_batch
    micro = global_batch // micro_batch
    return Batch(rows=rows, seq_len=seq, micro_batches=micro, per_rank=micro // dp)


def attention_kind(cfg: UALMConfig) -> str:
    """"te" (Transformer Engine's fused attention), "sdpa" (local spec, torch SDPA) or "local" (unfused)."""
    if cfg.parallel.transformer_impl == "transformer_engine":
        return "te"
    return "sdpa" if getattr(cfg, "attention_backend", "megatron") == "sdpa" else "local"


def activation_bytes(cfg: UALMConfig, batch: Batch, tp: int, pp: int, stage: int, recompute: str) -> float:
    """Activations of pipeline stage ``stage`` at its peak, bytes.

    Megatron's 1F1B schedule keeps min(pp - stage, micro-batches) micro-batches in flight on a stage (the first
    stage holds pp, as in Korthikanti et al.), each holding the stage's L / pp layers. With v virtual stages
    (interleaved schedule) a rank runs 2 (pp - stage - 1) + (v - 1) pp warm-up chunk forwards plus the one in
    flight, each holding L / (pp v) layers (all micro-batches x v when the warm-up covers them): the first stage
    then keeps L (1 + (pp - 1) / (pp v)) layers' worth, Korthikanti et al.'s interleaving factor. The heads'
    activations count once on the last stage (one micro-batch of the last chunk in flight). Full recompute adds
    one layer's activations (the layer being recomputed, one micro-batch). The frozen encoder runs without grad
    (nothing kept); the embedding output is the first layer's input (counted there).
    """
    p = cfg.parallel
    attention = attention_kind(cfg)
    tokens = batch.tokens_per_micro
    micro = max(batch.per_rank, 1)
    v = p.virtual_pipeline_model_parallel_size or 1
    if v > 1:
        chunks = micro * v if micro == pp else min(2 * (pp - stage - 1) + (v - 1) * pp + 1, micro * v)
        layers_in_flight = chunks * cfg.backbone.num_layers / (pp * v)
    else:
        layers_in_flight = min(pp - stage, micro) * cfg.backbone.num_layers / pp
    total = tokens * layers_in_flight * layer_activation_bytes(cfg.backbone, batch.seq_len, tp, p.sequence_parallel,
                                                               attention, recompute)
    if stage == pp - 1:
        total += tokens * head_activation_bytes(cfg, tp)
    if recompute == "full":
        total += tokens * layer_activation_bytes(cfg.backbone, batch.seq_len, tp, p.sequence_parallel, attention,
                                                 "none")
    return total


def wall_clock(flops_per_step: float, gpus: int, peak_flops: float, mfu: float, max_steps: int) -> dict[str, float]:
    """Seconds per step = FLOPs per step / (GPUs x peak x MFU); the run = train.max_steps of them."""
    step = flops_per_step / (gpus * peak_flops * mfu)
    return {"step_s": step, "run_s": step * max_steps}


# --- the command ---------------------------------------------------------------------------------------------

def audio_encoder_size(cfg: UALMConfig) -> tuple[int, int, str]:
    """(parameters, output dim, where the shape came from) of the frozen audio tower, counted exactly by building
    it on the meta device: the folder's config.json when encoder_path exists here, the tiny test tower when it is
    null, else Qwen2.5-Omni-7B's audio tower (transformers' default config; the released UALM's)."""
    import torch
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniAudioEncoderConfig

    from ualm_nemo.model import audio_input

    a = cfg.audio_in
    if not a.enabled:
        return 0, 0, "no audio input"
    path = Path(a.encoder_path) if a.encoder_path else None
    if getattr(a, "random_encoder", False) or a.encoder_path is None:
        config, source = audio_input.tiny_encoder_config(a), "tiny random tower"
    elif path is not None and (path / "config.json").is_file():
        audio_dict, _ = audio_input._find_audio_config(json.loads((path / "config.json").read_text()),
                                                       path / "config.json")
        config_class, _ = audio_input._TOWERS[audio_dict["model_type"]]
        config, source = config_class.from_dict(audio_dict), f"{path}/config.json"
    else:
        config, source = Qwen2_5OmniAudioEncoderConfig(), "Qwen2.5-Omni-7B audio tower (no config.json here)"
    tower_class = next(t for c, t in audio_input._TOWERS.values() if isinstance(config, c))
    with torch.device("meta"):
        tower = tower_class(config)
    dim = config.d_model if "flamingo" in type(config).__name__.lower() else config.output_dim
    return sum(p.numel() for p in tower.parameters()), dim, source


def compose_for_plan(overrides: list[str]) -> tuple[dict[str, Any], list[str]]:
    """The training config as launcher.validate composes it; '???' values left unset are filled with
    PLACEHOLDER (returned by key) so a plan needs no data folders."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from launcher.cluster import REPO
    from launcher.validate import compose_run

    try:
        return _encoder_placeholder(compose_run(overrides), [])
    except ConfigError as err:
        if "Missing mandatory value" not in str(err):
            raise
        error = err
    try:  # compose_run parsed these already: only the '???' values stopped it
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
            cfg = compose(config_name="train", overrides=[o for o in overrides if not o.startswith("hydra")])
        missing = sorted(OmegaConf.missing_keys(cfg))
        for key in missing:
            OmegaConf.update(cfg, key, PLACEHOLDER, force_add=True)
        values = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except Exception:
        raise error from None
    values.pop("hydra", None)
    return _encoder_placeholder(values, missing)


def _encoder_placeholder(values: dict[str, Any], missing: list[str]) -> tuple[dict[str, Any], list[str]]:
    """An enabled audio input needs model.audio_in.encoder_path (or random_encoder): a placeholder when unset."""
    audio_in = (values.get("model") or {}).get("audio_in") or {}
    if audio_in.get("enabled", True) and not audio_in.get("encoder_path") and not audio_in.get("random_encoder"):
        audio_in["encoder_path"] = PLACEHOLDER
        missing = sorted({*missing, "model.audio_in.encoder_path"})
    return values, missing


@dataclass(frozen=True)
class FailureAssumptions:
    """launcher.plan's --save-seconds, --write-gbps, --restart-seconds, --failures-per-gpu-day (failures.py)."""

    save_s: float | None = None  # measured step-time stall of one save; None: estimated from the bytes
    write_gbps: float = 2.0  # GB/s each node writes to the shared file system
    restart_s: float = 300.0  # requeue + start-up + checkpoint load after an interruption
    failures_per_gpu_day: float = LLAMA3_FAILURES_PER_GPU_DAY


def make_plan(run, cluster, placeholders: list[str], recompute: str = "none", mfu: float = 0.40,
              gpu: str = "h100", failures: FailureAssumptions = FailureAssumptions()) -> dict[str, Any]:
    """Everything the command prints, as plain data (``--json``); sizes in bytes, times in seconds."""
    cfg, t = run.model, run.train
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    world = cluster.world_size
    dp = cfg.parallel.data_parallel_size(world)  # world / (TP x PP x CP)
    enc_params, enc_dim, enc_source = audio_encoder_size(cfg)
    parts = parameter_counts(cfg, enc_params, enc_dim)
    layers = cfg.backbone.num_layers
    batch = batch_shape(t.global_batch_size, t.micro_batch_size, dp, run.data.seq_len, run.data.shar)
    peak, gpu_memory = GPUS[gpu]
    stages = []
    for stage in range(pp):
        params = per_rank_parameters(parts, layers, tp, pp, stage, t.stage)
        local = cfg.parallel.transformer_impl == "local"
        memory = state_bytes(params["with_grad"], params["total"] - params["with_grad"], cfg.params_dtype, dp,
                             cfg.parallel.use_distributed_optimizer, params["trainable_norms"] * local,
                             params["frozen_norms"] * local, 2.0 if cfg.parallel.grad_reduce_in_bf16 else 4.0)
        memory["activations"] = activation_bytes(cfg, batch, tp, pp, stage, recompute)
        memory["total"] = sum(memory.values())
        stages.append({"stage": stage, "parameters": params, "memory": memory})
    flops = flops_per_token(cfg, batch.seq_len)
    flops_step = flops["total"] * batch.tokens_per_step
    time = wall_clock(flops_step, world, peak, mfu, t.max_steps)
    whole = {p.label: (p.sharded + p.replicated) * (layers if p.where == "layer" else 1) for p in parts}
    one = per_rank_parameters(parts, layers, 1, 1, 0, t.stage)  # the whole model on one rank: what a save holds
    fail = plan_failures(gpus=world, step_s=time["step_s"], max_steps=t.max_steps,
                         every_n_steps=t.checkpoint_every_n_steps,
                         ckpt_bytes=checkpoint_bytes(one["total"], one["with_grad"], cfg.params_dtype),
                         nodes=cluster.nodes, write_gbps=failures.write_gbps, save_s=failures.save_s,
                         restart_s=failures.restart_s, failures_per_gpu_day=failures.failures_per_gpu_day)
    return {
        "layout": {"nodes": cluster.nodes, "gpus_per_node": cluster.ntasks_per_node, "world": world, "tp": tp,
                   "pp": pp, "dp": dp, "sequence_parallel": cfg.parallel.sequence_parallel,
                   "distributed_optimizer": cfg.parallel.use_distributed_optimizer, "params_dtype": cfg.params_dtype,
                   "transformer_impl": cfg.parallel.transformer_impl, "recompute": recompute, "stage": t.stage},
        "batch": {**asdict(batch), "tokens_per_micro": batch.tokens_per_micro,
                  "tokens_per_step": batch.tokens_per_step, "source": "shar" if run.data.shar else "manifests"},
        "parameters": {"whole_model": whole, "total": model_total(parts, layers),
                       "encoder_shape_from": enc_source},
        "stages": stages,
        "flops": {"per_token": flops, "per_step": flops_step},
        "time": {**time, "max_steps": t.max_steps, "mfu": mfu, "gpu": gpu, "peak_flops": peak,
                 "gpu_memory": gpu_memory, "tokens_per_s_per_gpu": batch.tokens_per_step / time["step_s"] / world},
        "failures": fail,
        "placeholders": placeholders,
    }


def _n(x: float) -> str:
    return f"{x / 1e9:.3f} B" if x >= 1e8 else f"{x / 1e6:.3f} M" if x >= 1e5 else f"{int(x):,}"


def _duration(s: float) -> str:
    return f"{s / 86400:.1f} days" if s >= 2 * 86400 else f"{s / 3600:.1f} h" if s >= 3600 else f"{s:.0f} s"


def render(plan: dict[str, Any]) -> str:
    """The plan as a readable table (per GPU, per pipeline stage), then totals."""
    L, b, tm, f = plan["layout"], plan["batch"], plan["time"], plan["flops"]
    stages = plan["stages"]
    heads = [f"stage {s['stage']}" for s in stages] if len(stages) > 1 else ["per GPU"]
    row = "  {:<44}" + "{:>16}" * len(stages)
    lines = [f"layout: {L['nodes']} node(s) x {L['gpus_per_node']} GPUs = {L['world']}; TP {L['tp']} x PP {L['pp']} x "
             f"DP {L['dp']}; {L['params_dtype']} weights, {'distributed' if L['distributed_optimizer'] else 'plain'}"
             f" optimizer, {L['transformer_impl']}, recompute {L['recompute']}, train.stage={L['stage']}",
             f"batch ({b['source']}, upper bound: rows full): {b['micro_batches']} micro-batches x {b['rows']} row(s) x "
             f"{b['seq_len']} positions = {b['tokens_per_step']:,} positions/step; {b['per_rank']} micro-batch(es) "
             "per DP rank"]
    if plan["placeholders"]:
        lines.append(f"filled for planning only (unset in conf/, give them to launcher.submit): "
                     f"{', '.join(plan['placeholders'])}")
    prow = row + "{:>16}"
    whole = plan["parameters"]["whole_model"]
    lines += ["", prow.format("parameters", *heads, "whole model")]
    for label, n in whole.items():
        lines.append(prow.format(label, *(_n(s["parameters"]["parts"].get(label, 0)) for s in stages), _n(n)))
    for key in ("trainable", "frozen", "total"):
        total = plan["parameters"]["total"] if key == "total" else ""
        lines.append(prow.format(key, *(_n(s["parameters"][key]) for s in stages), total and _n(total)))
    dtype_bytes = 2 if L["params_dtype"] == "bf16" else 4
    optim = ("fp32 master + Adam m, v" if L["params_dtype"] == "bf16" else "Adam m, v") + \
        (f"; / DP {L['dp']}" if L["distributed_optimizer"] else "")
    labels = {"weights": f"weights ({dtype_bytes} B/param)", "grads": "grads (fp32 grad buffer, trainable)",
              "optimizer": f"optimizer ({optim})", "activations": f"activations (recompute {L['recompute']})",
              "total": "total"}
    lines += ["", row.format("memory (GiB)", *heads)]
    for key, label in labels.items():
        lines.append(row.format(label, *(f"{s['memory'][key] / GiB:.2f}" for s in stages)))
    worst = max(s["memory"]["total"] for s in stages)
    verdict = "fits" if worst < tm["gpu_memory"] else "does NOT fit"
    lines.append(f"  {tm['gpu'].upper()} (--gpu) has {tm['gpu_memory'] / 1e9:.0f} GB = {tm['gpu_memory'] / GiB:.1f} GiB: {verdict}"
                 f" ({(tm['gpu_memory'] - worst) / GiB:+.1f} GiB left before the CUDA context, NCCL buffers and "
                 "allocator fragmentation, typically 3-8 GiB)")
    pt = f["per_token"]
    lines += ["", f"audio tower shape: {plan['parameters']['encoder_shape_from']}",
              f"FLOPs per token: 6 x {_n(pt['matmul_params'])} matmul weights + attention 12 L h s = "
              f"{pt['dense'] / 1e9:.1f} + {pt['attention'] / 1e9:.1f} = {pt['total'] / 1e9:.1f} GFLOP",
              f"FLOPs per step: {f['per_step']:.3e} ({b['tokens_per_step']:,} positions)",
              f"at MFU {tm['mfu']:.2f} on {L['world']} x {tm['gpu'].upper()} ({tm['peak_flops'] / 1e12:.0f} TFLOP/s "
              f"bf16 dense): {tm['step_s']:.2f} s/step, {tm['tokens_per_s_per_gpu']:,.0f} positions/s per GPU",
              f"train.max_steps={tm['max_steps']:,}: {_duration(tm['run_s'])} "
              f"({tm['run_s'] / 3600 * L['world']:,.0f} GPU-hours)", ""] + render_failures(plan["failures"])
    return "\n".join(lines) + "\n"


def _default_gpu(preset: str | None) -> str:
    """The GPU a cluster preset names (``dgx-h100`` -> h100); h100 otherwise."""
    name = Path(preset).stem.lower() if preset else ""
    return next((g for g in GPUS if g in name), "h100")


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.filterwarnings("ignore")  # megatron's "TE/Apex not installed" notes on import: not this command's
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from launcher.submit import _cluster_from_args, _parser
    from launcher.validate import check_layout
    from ualm_nemo.training.run_config import run_config_from_dict

    parser = _parser()
    parser.prog = "python -m launcher.plan"
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("--recompute", choices=RECOMPUTE, default=None,
                        help="activation recomputation assumed (none, selective: attention scores, full: per layer; "
                             "default: model.recompute.granularity)")
    parser.add_argument("--mfu", type=float, default=0.40, help="model FLOPs utilisation assumed (default 0.40)")
    parser.add_argument("--gpu", choices=sorted(GPUS), help="peak FLOP/s and memory (default: from the preset name, "
                                                            "else h100)")
    parser.add_argument("--save-seconds", type=float, default=None,
                        help="measured step-time stall of one checkpoint save (perf/checkpoint_save_s); default: "
                             "estimated from the checkpoint bytes and --write-gbps")
    parser.add_argument("--write-gbps", type=float, default=2.0,
                        help="GB/s each node writes to the shared file system (default 2)")
    parser.add_argument("--restart-seconds", type=float, default=300.0,
                        help="seconds from an interruption to training again: requeue, start-up, load (default 300)")
    parser.add_argument("--failures-per-gpu-day", type=float, default=LLAMA3_FAILURES_PER_GPU_DAY,
                        help="interruptions per GPU-day (default 4.7e-4: Llama 3's 419 in 54 days on 16k GPUs)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.entry != "ualm":
            raise ConfigError("--entry: launcher.plan sizes the language model (conf/train.yaml) only")
        if not 0 < args.mfu <= 1:
            raise ConfigError(f"--mfu={args.mfu} must lie in (0, 1]")
        for flag in ("save_seconds", "write_gbps", "failures_per_gpu_day"):
            if getattr(args, flag) is not None and getattr(args, flag) <= 0:
                raise ConfigError(f"--{flag.replace('_', '-')}={getattr(args, flag)} must be > 0")
        if args.restart_seconds < 0:
            raise ConfigError(f"--restart-seconds={args.restart_seconds} must be >= 0")
        cluster = _cluster_from_args(args)
        values, placeholders = compose_for_plan(list(args.overrides))
        run = run_config_from_dict(values)
        check_layout(run, cluster)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    recompute = args.recompute or run.model.recompute.granularity or "none"
    failures = FailureAssumptions(args.save_seconds, args.write_gbps, args.restart_seconds, args.failures_per_gpu_day)
    plan = make_plan(run, cluster, placeholders, recompute, args.mfu, args.gpu or _default_gpu(args.cluster), failures)
    print(json.dumps(plan, indent=1) if args.json else render(plan), end="" if not args.json else "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
