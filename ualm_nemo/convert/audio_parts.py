"""The parts of UALM that a Qwen2 HF model does not have, and the files they live in beside it.

An exported HF folder::

    config.json, model*.safetensors[, index]   Qwen2ForCausalLM: text rows [0, text_vocab) of embedding and head
    audio.safetensors                          the tensors below (names on the left)
    audio_encoder/                             the frozen audio tower, an encoder-only HF folder (if audio_in.enabled)
    ualm_config.json                           dataclasses.asdict(UALMConfig), layout reset to TP1/PP1
    tokenizer files
    README.md                                  the model card (model_card.py)

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

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor

from ualm_nemo.convert.hf_folder import read_header, read_tensor
from ualm_nemo.model.config import UALMConfig

AUDIO_FILE = "audio.safetensors"
ENCODER_DIR = "audio_encoder"
UALM_CONFIG_FILE = "ualm_config.json"
ENCODER_PREFIX = "audio_input.encoder.tower."
ADAPTER_PREFIX = "audio_input.adapter."


def iter_audio_parts(state: Mapping[str, Any], cfg: UALMConfig) -> Iterator[tuple[str, Tensor]]:
    """The tensors of ``audio.safetensors``, one at a time, from a full TP1/PP1 UALM state (a dict, or a
    checkpoint reader that loads each key when asked: each table is read once per entry and dropped)."""
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
    for key in ("embedding.text.weight", "embedding.audio.weight", "heads.text_head.weight",
                "heads.audio_head.weight"):
        name, rows = vocab_rows(key, cfg)
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


def is_ualm_export(folder: str | Path) -> bool:
    """A folder written by the exporter (``ualm_config.json`` or ``audio.safetensors`` beside the Qwen2 files)."""
    return (Path(folder) / UALM_CONFIG_FILE).is_file() or (Path(folder) / AUDIO_FILE).is_file()


def export_config(folder: str | Path) -> UALMConfig | None:
    """The model config a UALM export records, its relative encoder path (``audio_encoder``) made absolute;
    None for a folder without ``ualm_config.json``."""
    folder = Path(folder)
    config_file = folder / UALM_CONFIG_FILE
    if not config_file.is_file():
        return None
    try:
        cfg = UALMConfig.from_dict(json.loads(config_file.read_text()))
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"{config_file}: not a UALM model config ({err})") from None
    return with_export_encoder(cfg, folder)


def with_export_encoder(cfg: UALMConfig, folder: str | Path) -> UALMConfig:
    """``cfg`` with the audio tower read from the export's ``audio_encoder/`` (its trained weights, not a random
    or other tower) when the audio input is on and the folder has one."""
    encoder_dir = Path(folder) / ENCODER_DIR
    if not cfg.audio_in.enabled or not (encoder_dir / "config.json").is_file():
        return cfg
    return replace(cfg, audio_in=replace(cfg.audio_in, encoder_path=str(encoder_dir.resolve()), random_encoder=False))


def adapter_shapes(cfg: UALMConfig, encoder_dim: int | None) -> dict[str, tuple[int, ...] | None]:
    """{``adapter.*`` name: shape} the config's adapter has (None where the encoder's output width, not yet known
    without the model, decides it)."""
    if not cfg.audio_in.enabled:
        return {}
    h = cfg.backbone.hidden_size
    out: dict[str, tuple[int, ...] | None] = {"adapter.fc1.weight": (h, encoder_dim) if encoder_dim else None,
                                              "adapter.fc1.bias": (h,)}
    if cfg.audio_in.adapter == "mlp":
        out.update({"adapter.fc2.weight": (h, h), "adapter.fc2.bias": (h,)})
    return out


class ExportAudioFile:
    """``audio.safetensors`` of a UALM export, checked against the model config it is imported with, read one
    tensor at a time (an import of an export takes every audio part from here: nothing is dropped)."""

    def __init__(self, folder: str | Path, cfg: UALMConfig) -> None:
        self.path = Path(folder) / AUDIO_FILE
        if not self.path.is_file():
            raise FileNotFoundError(f"{folder} is a UALM export ({UALM_CONFIG_FILE}) without {AUDIO_FILE}: its audio "
                                    "rows, heads and adapter are missing (export it again, or import a plain Qwen2 "
                                    f"folder without {UALM_CONFIG_FILE})")
        self.header, self._start = read_header(self.path)
        self.check(cfg)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v["shape"]) for k, v in self.header.items()}

    def check(self, cfg: UALMConfig, encoder_dim: int | None = None) -> None:
        """ValueError naming every entry that is missing, extra or of the wrong shape for ``cfg``."""
        expected = {**expected_audio_shapes(cfg), **adapter_shapes(cfg, encoder_dim)}
        have = self.shapes()
        problems = [f"{k} missing" for k in expected if k not in have]
        problems += [f"{k} {have[k]} (the config needs {shape})" for k, shape in expected.items()
                     if k in have and shape is not None and have[k] != shape]
        extra = sorted(set(have) - set(expected))
        if extra:
            problems.append(f"{', '.join(extra[:4])} not used by the config")
        if problems:
            raise ValueError(f"{self.path} does not fit the model config (model.audio_out.head="
                             f"{cfg.audio_out.head!r}, model.audio_in.enabled={cfg.audio_in.enabled}, adapter="
                             f"{cfg.audio_in.adapter!r}): {'; '.join(problems)}")

    def get(self, name: str) -> Tensor:
        return read_tensor(self.path, self.header[name], self._start)


def part_of(key: str) -> str | None:
    """The ``audio.safetensors`` entry a whole UALM tensor comes from (the vocabulary tables' rows: see
    ``vocab_rows``), or None."""
    if key in ("heads.stream_embedding", "heads.codebook_heads"):
        return "head." + key.removeprefix("heads.")
    if key.startswith(ADAPTER_PREFIX):
        return "adapter." + key.removeprefix(ADAPTER_PREFIX)
    return None


def vocab_rows(key: str, cfg: UALMConfig) -> tuple[str, slice]:
    """(``audio.safetensors`` entry, rows of the UALM table it fills) of a vocabulary table; the inverse of the
    slices ``iter_audio_parts`` takes."""
    v, t, a = cfg.backbone.text_vocab_size, cfg.num_text_rows, cfg.num_audio_rows
    return {"embedding.text.weight": ("embedding.specials", slice(v, t)),
            "embedding.audio.weight": ("embedding.audio", slice(0, a)),
            "heads.text_head.weight": ("head.specials", slice(v, t)),
            "heads.audio_head.weight": ("head.audio", slice(0, a))}[key]


@torch.no_grad()
def fill_from_export(key: str, table: Tensor, audio: ExportAudioFile, cfg: UALMConfig) -> None:
    """Write an exported table's rows (specials or audio rows) into the UALM table, in place."""
    name, rows = vocab_rows(key, cfg)
    table[rows].copy_(audio.get(name).to(table.dtype))
