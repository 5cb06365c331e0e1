"""The parts of UALM that a Qwen2 HF model does not have, and the files they live in beside it.

An exported HF folder::

    config.json, model*.safetensors[, index]   Qwen2ForCausalLM: text rows [0, text_vocab) of embedding and head
    audio.safetensors                          the tensors below (names on the left)
    audio_encoder/                             the frozen audio tower, an encoder-only HF folder (if audio_in.enabled)
    ualm_config.json                           dataclasses.asdict(UALMConfig), layout reset to TP1/PP1
    tokenizer files

``audio.safetensors`` (V = text vocab, S = 4 specials, A = 8 x 1025 audio rows; vocabulary padding dropped)::

    embedding.specials [S, h]   <- embedding.text.weight rows [V, V+S)
    embedding.audio    [A, h]   <- embedding.audio.weight rows [0, A)
    head.specials      [S, h]   <- heads.text_head.weight rows [V, V+S)
    head.audio         [A, h]   <- heads.audio_head.weight rows [0, A)
    head.stream_embedding [N-1, h]          <- heads.stream_embedding        (audio_out.head=shared)
    head.codebook_heads   [N-1, 1025, h]    <- heads.codebook_heads          (audio_out.head=per_codebook)
    adapter.*                               <- audio_input.adapter.*
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

from torch import Tensor

from ualm_nemo.model.config import UALMConfig

AUDIO_FILE = "audio.safetensors"
ENCODER_DIR = "audio_encoder"
UALM_CONFIG_FILE = "ualm_config.json"
ENCODER_PREFIX = "audio_input.encoder.tower."
ADAPTER_PREFIX = "audio_input.adapter."


def iter_audio_parts(state: Mapping[str, Any], cfg: UALMConfig) -> Iterator[tuple[str, Tensor]]:
    """The tensors of ``audio.safetensors``, one at a time, from a full TP1/PP1 UALM state (a dict, or a
    checkpoint reader that loads each key when asked: each table is read once per entry and dropped)."""
    v, t, a = cfg.backbone.text_vocab_size, cfg.num_text_rows, cfg.num_audio_rows
    head_key = "heads.stream_embedding" if cfg.audio_out.head == "shared" else "heads.codebook_heads"
    needed = ["embedding.text.weight", "embedding.audio.weight", "heads.text_head.weight", "heads.audio_head.weight",
              head_key]
    missing = [k for k in needed if k not in state]
    if missing:
        raise ValueError(f"UALM state lacks {missing} (model.audio_out.head={cfg.audio_out.head!r}; "
                         "expected a full TP1/PP1 state)")
    adapter = [k for k in state.keys() if k.startswith(ADAPTER_PREFIX)]
    if cfg.audio_in.enabled and not adapter:
        raise ValueError("model.audio_in.enabled=true but the UALM state has no audio_input.adapter.* tensors")
    for name, key, rows in (("embedding.specials", "embedding.text.weight", slice(v, t)),
                            ("embedding.audio", "embedding.audio.weight", slice(0, a)),
                            ("head.specials", "heads.text_head.weight", slice(v, t)),
                            ("head.audio", "heads.audio_head.weight", slice(0, a))):
        yield name, state[key][rows].clone()  # the rows only: the table itself is not kept
    yield "head." + head_key.removeprefix("heads."), state[head_key]
    for key in adapter:
        yield "adapter." + key.removeprefix(ADAPTER_PREFIX), state[key]


def expected_audio_shapes(cfg: UALMConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the non-adapter entries of ``audio.safetensors`` for ``cfg``."""
    h, n, span = cfg.backbone.hidden_size, cfg.audio_out.num_codebooks, cfg.vocab.codebook_span
    specials = cfg.num_text_rows - cfg.backbone.text_vocab_size
    out = {"embedding.specials": (specials, h), "embedding.audio": (cfg.num_audio_rows, h),
           "head.specials": (specials, h), "head.audio": (cfg.num_audio_rows, h)}
    if cfg.audio_out.head == "shared":
        out["head.stream_embedding"] = (n - 1, h)
    else:
        out["head.codebook_heads"] = (n - 1, span, h)
    return out


def encoder_keys(state: Mapping[str, Any]) -> dict[str, str]:
    """{name in an encoder-only HF folder (``Qwen2_5OmniAudioEncoder``): UALM key} of the audio tower."""
    return {k.removeprefix(ENCODER_PREFIX): k for k in state.keys() if k.startswith(ENCODER_PREFIX)}
