"""HF Qwen2 <-> UALM backbone: one declarative key map, applied in both directions.

The UALM side is the *full, unsharded* (TP1/PP1) state dict of ``UALMLanguageModel`` with the local layer
spec; resharding to other layouts is the dist-checkpoint's job (save at TP1, load anywhere). Each ``Rule`` names
the HF key(s), the Megatron key, both shapes, and a pair of small pure transforms::

    HF (per layer n)                                   Megatron (per layer n)
    model.layers.n.self_attn.{q,k,v}_proj.{weight,bias} -> decoder.layers.n.self_attention.linear_qkv.{weight,bias}
    model.layers.n.mlp.{gate,up}_proj.weight            -> decoder.layers.n.mlp.linear_fc1.weight   (cat, dim 0)
    model.embed_tokens.weight [V, h]                    -> embedding.text.weight rows [0, V)  (specials, padding kept)
    lm_head.weight [V, h]                               -> heads.text_head.weight rows [0, V)

Fused QKV in Megatron's layout, per query group g (this is what keeps whole groups on one TP rank)::

    [ q rows of the heads_per_group heads of group g | k rows of g | v rows of g ]   (each head: head_dim rows)

which matches HF's GQA (``repeat_kv``): query head i reads KV head i // heads_per_group.

Everything the HF model lacks (audio embedding and head rows, stream embedding / codebook heads, the audio
input path, the 4 UALM specials and vocabulary padding) is left as it is in the ``base`` state dict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import torch
from torch import Tensor

from ualm_nemo.model.config import UALMConfig, padded

if TYPE_CHECKING:
    from transformers import Qwen2Config

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Dims:
    """Backbone sizes the transforms and shape checks need (derived from a UALMConfig)."""

    hidden: int
    ffn: int
    heads: int
    groups: int
    head_dim: int
    text_vocab: int  # HF vocab rows
    text_rows: int  # rows of UALM's padded text table (text + specials, padded)

    @classmethod
    def of(cls, cfg: UALMConfig) -> "Dims":
        b = cfg.backbone
        return cls(hidden=b.hidden_size, ffn=b.ffn_hidden_size, heads=b.num_attention_heads,
                   groups=b.num_query_groups, head_dim=b.kv_channels, text_vocab=b.text_vocab_size,
                   text_rows=padded(cfg.num_text_rows))

    @property
    def q(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv(self) -> int:
        return self.groups * self.head_dim


# --- transforms: HF parts -> Megatron tensor (``base`` is the initialised Megatron tensor), and back ----------
def _copy(parts: tuple[Tensor, ...], base: Tensor, d: Dims) -> Tensor:
    return parts[0]


def _uncopy(t: Tensor, d: Dims) -> tuple[Tensor, ...]:
    return (t,)


def _into_text_rows(parts: tuple[Tensor, ...], base: Tensor, d: Dims) -> Tensor:
    """HF [V, h] -> UALM text table: rows [0, V) replaced, specials and padding rows kept from base."""
    out = base.detach().clone()
    out[: d.text_vocab] = parts[0]
    return out


def _text_rows(t: Tensor, d: Dims) -> tuple[Tensor, ...]:
    """A view (no copy of a ~1 GB table while streaming); it shares the table's storage, like the other views."""
    return (t[: d.text_vocab],)


def _fuse_qkv(parts: tuple[Tensor, ...], base: Tensor, d: Dims) -> Tensor:
    """q [heads*hd, ...], k/v [groups*hd, ...] -> [groups * (heads/groups + 2) * hd, ...] (weight or bias)."""
    q, k, v = parts
    rest = q.shape[1:]
    q = q.reshape(d.groups, (d.heads // d.groups) * d.head_dim, *rest)
    k = k.reshape(d.groups, d.head_dim, *rest)
    v = v.reshape(d.groups, d.head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def _split_qkv(t: Tensor, d: Dims) -> tuple[Tensor, ...]:
    rest = t.shape[1:]
    per_group = t.reshape(d.groups, (d.heads // d.groups + 2) * d.head_dim, *rest)
    q, k, v = per_group.split([(d.heads // d.groups) * d.head_dim, d.head_dim, d.head_dim], dim=1)
    return tuple(x.reshape(-1, *rest).clone() for x in (q, k, v))


def _cat_gate_up(parts: tuple[Tensor, ...], base: Tensor, d: Dims) -> Tensor:
    """gate [f, h], up [f, h] -> fc1 [2f, h]: Megatron's SwiGLU reads silu(first half) * second half."""
    return torch.cat(parts, dim=0)


def _split_gate_up(t: Tensor, d: Dims) -> tuple[Tensor, ...]:
    return tuple(x.clone() for x in t.split(d.ffn, dim=0))


@dataclass(frozen=True)
class Rule:
    """HF key(s) <-> one Megatron key. ``{n}`` in a pattern is the layer index (rule applies to every layer)."""

    hf: tuple[str, ...]
    megatron: str
    hf_shapes: Callable[[Dims], tuple[Shape, ...]]
    megatron_shape: Callable[[Dims], Shape]
    to_megatron: Callable[[tuple[Tensor, ...], Tensor, Dims], Tensor] = _copy
    to_hf: Callable[[Tensor, Dims], tuple[Tensor, ...]] = _uncopy

    @property
    def per_layer(self) -> bool:
        return "{n}" in self.megatron


_HF_LAYER, _MC_LAYER = "model.layers.{n}.", "decoder.layers.{n}."

KEY_MAP: tuple[Rule, ...] = (
    Rule(("model.embed_tokens.weight",), "embedding.text.weight",
         lambda d: ((d.text_vocab, d.hidden),), lambda d: (d.text_rows, d.hidden), _into_text_rows, _text_rows),
    Rule((_HF_LAYER + "input_layernorm.weight",), _MC_LAYER + "input_layernorm.weight",
         lambda d: ((d.hidden,),), lambda d: (d.hidden,)),
    Rule(tuple(_HF_LAYER + f"self_attn.{p}_proj.weight" for p in "qkv"),
         _MC_LAYER + "self_attention.linear_qkv.weight",
         lambda d: ((d.q, d.hidden), (d.kv, d.hidden), (d.kv, d.hidden)),
         lambda d: (d.q + 2 * d.kv, d.hidden), _fuse_qkv, _split_qkv),
    Rule(tuple(_HF_LAYER + f"self_attn.{p}_proj.bias" for p in "qkv"),
         _MC_LAYER + "self_attention.linear_qkv.bias",
         lambda d: ((d.q,), (d.kv,), (d.kv,)), lambda d: (d.q + 2 * d.kv,), _fuse_qkv, _split_qkv),
    Rule((_HF_LAYER + "self_attn.o_proj.weight",), _MC_LAYER + "self_attention.linear_proj.weight",
         lambda d: ((d.hidden, d.q),), lambda d: (d.hidden, d.q)),
    Rule((_HF_LAYER + "post_attention_layernorm.weight",), _MC_LAYER + "pre_mlp_layernorm.weight",
         lambda d: ((d.hidden,),), lambda d: (d.hidden,)),
    Rule((_HF_LAYER + "mlp.gate_proj.weight", _HF_LAYER + "mlp.up_proj.weight"), _MC_LAYER + "mlp.linear_fc1.weight",
         lambda d: ((d.ffn, d.hidden), (d.ffn, d.hidden)), lambda d: (2 * d.ffn, d.hidden),
         _cat_gate_up, _split_gate_up),
    Rule((_HF_LAYER + "mlp.down_proj.weight",), _MC_LAYER + "mlp.linear_fc2.weight",
         lambda d: ((d.hidden, d.ffn),), lambda d: (d.hidden, d.ffn)),
    Rule(("model.norm.weight",), "decoder.final_layernorm.weight", lambda d: ((d.hidden,),), lambda d: (d.hidden,)),
    Rule(("lm_head.weight",), "heads.text_head.weight",
         lambda d: ((d.text_vocab, d.hidden),), lambda d: (d.text_rows, d.hidden), _into_text_rows, _text_rows),
)

# HF keys that carry no weights (old checkpoints saved the RoPE buffer); accepted and dropped on import.
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


def _expand(rule: Rule, num_layers: int):
    """Yield (hf_keys, megatron_key) for every layer a rule covers."""
    layers = range(num_layers) if rule.per_layer else [None]
    for n in layers:
        yield tuple(k.format(n=n) for k in rule.hf), rule.megatron.format(n=n)


def _check_shape(key: str, got: Shape, want: Shape, where: str) -> None:
    if tuple(got) != tuple(want):
        raise ValueError(f"{where} {key!r}: shape {tuple(got)} does not match the expected {tuple(want)} "
                         "(check that the UALM backbone config matches the HF checkpoint)")


def expected_hf_shapes(cfg: UALMConfig) -> dict[str, Shape]:
    """Every HF Qwen2 key the backbone maps to, with its shape (untied: lm_head.weight included)."""
    d = Dims.of(cfg)
    out: dict[str, Shape] = {}
    for rule in KEY_MAP:
        for hf_keys, _ in _expand(rule, cfg.backbone.num_layers):
            out.update(zip(hf_keys, rule.hf_shapes(d)))
    return out


def resolve_hf_sources(hf_shapes: Mapping[str, Shape], cfg: UALMConfig) -> dict[str, str]:
    """Check an HF checkpoint's keys and shapes against the backbone config, before any tensor is read.

    Returns {expected HF key: the key to read it from} (a tied source reads ``lm_head.weight`` from
    ``model.embed_tokens.weight``). Raises ValueError naming the keys on missing / unexpected keys and shapes.
    """
    sources = {k: k for k in hf_shapes}
    if "lm_head.weight" not in hf_shapes and cfg.backbone.tie_word_embeddings_in_source \
            and "model.embed_tokens.weight" in hf_shapes:
        sources["lm_head.weight"] = "model.embed_tokens.weight"  # tied source: head = embedding
    want = expected_hf_shapes(cfg)
    missing = sorted(k for k in want if k not in sources)
    unexpected = sorted(k for k in hf_shapes if k not in want and not k.endswith(IGNORED_HF_SUFFIXES))
    if missing or unexpected:
        hint = " (a tied-embedding checkpoint needs model.backbone.tie_word_embeddings_in_source=true)" \
            if missing == ["lm_head.weight"] else ""
        raise ValueError(f"HF state dict does not match the UALM backbone config: missing {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}{hint}")
    for key, shape in want.items():
        _check_shape(key, hf_shapes[sources[key]], shape, "HF tensor")
    return {k: sources[k] for k in want}


def iter_hf_to_ualm(read: Callable[[str], Tensor], sources: Mapping[str, str], cfg: UALMConfig,
                    base: Mapping[str, Any], in_place: bool = False) -> Iterator[tuple[str, Tensor]]:
    """Yield (Megatron key, tensor) one at a time, reading HF tensors through ``read`` only when needed.

    ``sources`` comes from :func:`resolve_hf_sources`; ``base`` is an initialised full TP1/PP1 UALM state dict
    (its entries give dtype, and the rows HF does not have). Streaming: at most one rule's HF tensors are alive.
    ``in_place``: the text tables' HF rows are written straight into ``base`` (the yielded tensor *is* the base
    entry) instead of into a copy of the whole table -- for a caller that writes every result into ``base``.
    """
    d = Dims.of(cfg)
    for rule in KEY_MAP:
        for hf_keys, mkey in _expand(rule, cfg.backbone.num_layers):
            if mkey not in base:
                raise ValueError(f"base UALM state dict has no {mkey!r} (expected a full TP1/PP1 state dict)")
            _check_shape(mkey, base[mkey].shape, rule.megatron_shape(d), "base UALM tensor")
            parts = tuple(read(sources[k]).to(base[mkey].dtype) for k in hf_keys)
            if in_place and rule.to_megatron is _into_text_rows:
                with torch.no_grad():
                    base[mkey][: d.text_vocab].copy_(parts[0])
                yield mkey, base[mkey]
                continue
            yield mkey, rule.to_megatron(parts, base[mkey], d).contiguous()


def megatron_sources(cfg: UALMConfig) -> dict[str, tuple[Rule, tuple[str, ...]]]:
    """{Megatron key: (its rule, the HF keys it is made from)} for every backbone tensor of ``cfg``."""
    return {mkey: (rule, hf_keys) for rule in KEY_MAP for hf_keys, mkey in _expand(rule, cfg.backbone.num_layers)}


def is_text_table(rule: Rule) -> bool:
    """The rule fills only the HF rows of a larger UALM table (embedding / head); its other rows are new."""
    return rule.to_megatron is _into_text_rows


def map_one(rule: Rule, parts: tuple[Tensor, ...], cfg: UALMConfig) -> Tensor:
    """One Megatron tensor from its HF parts, for a rule that makes the whole tensor (not a text table)."""
    if is_text_table(rule):
        raise ValueError(f"{rule.megatron}: a text table needs its new rows too (see convert/importer.py)")
    return rule.to_megatron(parts, None, Dims.of(cfg)).contiguous()


def num_mapped_tensors(cfg: UALMConfig) -> int:
    """How many Megatron tensors the backbone map produces (for progress bars)."""
    return sum(cfg.backbone.num_layers if rule.per_layer else 1 for rule in KEY_MAP)


def hf_to_ualm(hf_state: Mapping[str, Tensor], cfg: UALMConfig, base: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` (an initialised TP1/PP1 UALM state dict) with the backbone taken from ``hf_state``.

    Tensors are cast to the dtype of the base entry they replace. Raises ValueError naming the key on a missing
    or unexpected HF key and on any shape mismatch (HF tensor vs config, or base tensor vs config).
    """
    hf_state = {k: v for k, v in hf_state.items() if v is not None}
    sources = resolve_hf_sources({k: tuple(v.shape) for k, v in hf_state.items()}, cfg)
    out = dict(base)
    out.update(iter_hf_to_ualm(hf_state.__getitem__, sources, cfg, base))
    return out


def iter_ualm_to_hf(ualm_state: Mapping[str, Any], cfg: UALMConfig) -> Iterator[tuple[str, Tensor]]:
    """Yield (HF key, tensor) of the backbone one at a time from a full TP1/PP1 UALM state dict (or anything
    with ``in`` and ``[key]``, e.g. a checkpoint reader: each key is read once)."""
    d = Dims.of(cfg)
    for rule in KEY_MAP:
        for hf_keys, mkey in _expand(rule, cfg.backbone.num_layers):
            if mkey not in ualm_state:
                raise ValueError(f"UALM state dict has no {mkey!r} (expected a full TP1/PP1 state dict)")
            tensor = ualm_state[mkey]  # read once: ``ualm_state`` may load it from a checkpoint
            _check_shape(mkey, tensor.shape, rule.megatron_shape(d), "UALM tensor")
            yield from zip(hf_keys, rule.to_hf(tensor, d))
            del tensor


def ualm_to_hf(ualm_state: Mapping[str, Any], cfg: UALMConfig) -> dict[str, Tensor]:
    """HF Qwen2ForCausalLM state dict (untied: ``lm_head.weight`` included) from a full TP1/PP1 UALM state dict.

    Only the backbone is exported; audio parts and the UALM specials' rows are not HF Qwen2 weights.
    """
    return dict(iter_ualm_to_hf(ualm_state, cfg))


# --- configs -----------------------------------------------------------------------------------------------
def qwen2_config_for(cfg: UALMConfig, **overrides: Any) -> "Qwen2Config":
    """The HF Qwen2 config of the UALM backbone (untied head: UALM trains its text head separately)."""
    from transformers import Qwen2Config

    b = cfg.backbone
    kw = dict(hidden_size=b.hidden_size, intermediate_size=b.ffn_hidden_size,
              num_attention_heads=b.num_attention_heads, num_key_value_heads=b.num_query_groups,
              num_hidden_layers=b.num_layers, vocab_size=b.text_vocab_size, rms_norm_eps=b.norm_eps,
              rope_parameters={"rope_type": "default", "rope_theta": b.rope_base}, hidden_act="silu",
              tie_word_embeddings=False, max_position_embeddings=b.max_position_embeddings,
              use_sliding_window=False)
    kw.update(overrides)
    return Qwen2Config(**kw)


def _rope(hf_config: Any) -> tuple[str, float | None]:
    """(rope_type, rope_theta) from a transformers 5.x (``rope_parameters``) or 4.x (``rope_theta``) config."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    return rope_type, params.get("rope_theta", getattr(hf_config, "rope_theta", None))


def check_compatible(hf_config: Any, cfg: UALMConfig) -> None:
    """Raise ValueError listing every HF config field that disagrees with the UALM backbone config.

    Not compared: ``tie_word_embeddings`` (an import concern: see ``tie_word_embeddings_in_source``) and
    ``max_position_embeddings`` (changes neither the weights nor the math).
    """
    b = cfg.backbone
    rope_type, rope_theta = _rope(hf_config)
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    pairs = {  # hf field: (hf value, ualm value, where the ualm value comes from)
        "hidden_size": (hf_config.hidden_size, b.hidden_size, "model.backbone.hidden_size"),
        "intermediate_size": (hf_config.intermediate_size, b.ffn_hidden_size, "model.backbone.ffn_hidden_size"),
        "num_attention_heads": (hf_config.num_attention_heads, b.num_attention_heads,
                                "model.backbone.num_attention_heads"),
        "num_key_value_heads": (hf_config.num_key_value_heads, b.num_query_groups, "model.backbone.num_query_groups"),
        "num_hidden_layers": (hf_config.num_hidden_layers, b.num_layers, "model.backbone.num_layers"),
        "vocab_size": (hf_config.vocab_size, b.text_vocab_size, "model.backbone.text_vocab_size"),
        "rms_norm_eps": (hf_config.rms_norm_eps, b.norm_eps, "model.backbone.norm_eps"),
        "rope_theta": (rope_theta, b.rope_base, "model.backbone.rope_base"),
        "head_dim": (head_dim, b.kv_channels, "hidden_size / num_attention_heads"),
        "hidden_act": (getattr(hf_config, "hidden_act", "silu"), "silu", "fixed: SwiGLU"),
        "rope_type": (rope_type, "default", "fixed: plain RoPE"),
        "use_sliding_window": (bool(getattr(hf_config, "use_sliding_window", False)), False,
                               "fixed: full attention"),
    }
    diffs = [f"{name}: HF {hf!r} != UALM {ours!r} ({where})" for name, (hf, ours, where) in pairs.items()
             if hf != ours]
    if diffs:
        raise ValueError("HF Qwen2 config does not match the UALM backbone: " + "; ".join(diffs))
