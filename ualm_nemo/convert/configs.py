"""UALM model configs for the converters: from a name / YAML file / JSON, from an HF config, to JSON."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

from ualm_nemo.model.config import BackboneConfig, ConfigError, UALMConfig

CONF_DIR = Path(__file__).resolve().parents[2] / "conf" / "model"


def config_to_dict(cfg: UALMConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def load_model_config(spec: str, overrides: Sequence[str] = ()) -> UALMConfig:
    """``spec``: a name under conf/model (``tiny``, ``qwen2.5-7b``), a YAML file (the ``model`` section of a run)
    or a ``ualm_config.json``; ``overrides``: OmegaConf dot-list (``audio_out.head=per_codebook``)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    path = Path(spec)
    if not path.is_file():
        path = CONF_DIR / f"{spec}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in CONF_DIR.glob("*.yaml"))
            raise ConfigError(f"model config {spec!r} is neither a file nor one of {known}")
    if path.suffix == ".json":
        section = OmegaConf.create(json.loads(path.read_text()))
    else:
        section = OmegaConf.load(path)
    section = OmegaConf.merge(section, OmegaConf.from_dotlist(list(overrides)))
    try:
        values = OmegaConf.to_container(section, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as err:
        raise ConfigError(f"model config {path}: {err.full_key} must be set (e.g. --set {err.full_key}=...)") from err
    return UALMConfig.from_dict(values)


def backbone_from_hf_config(hf: dict[str, Any]) -> BackboneConfig:
    """The UALM backbone of an HF Qwen2 ``config.json`` (as a dict); unsupported variants are rejected."""
    if hf.get("model_type") not in ("qwen2", None):
        raise ConfigError(f"HF config.json has model_type={hf.get('model_type')!r}; only Qwen2 (Qwen2.5) imports")
    need = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")
    missing = [k for k in need if k not in hf]
    if missing:
        raise ConfigError(f"HF config.json lacks {missing}")
    rope = hf.get("rope_parameters") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    return BackboneConfig(num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
                          ffn_hidden_size=hf["intermediate_size"], num_attention_heads=hf["num_attention_heads"],
                          num_query_groups=hf.get("num_key_value_heads", hf["num_attention_heads"]),
                          text_vocab_size=hf["vocab_size"], norm_eps=hf.get("rms_norm_eps", 1e-6),
                          rope_base=float(theta), max_position_embeddings=hf.get("max_position_embeddings", 32768),
                          tie_word_embeddings_in_source=bool(hf.get("tie_word_embeddings", False)))
