"""HF Qwen2.5 folder -> UALM distributed checkpoint (model weights only, step 0), loadable at any TP/PP.

Route: build the TP1/PP1 UALM model *without* Megatron's initialisation: its big tensors are allocated and never
written, so they cost address space, not memory; it only describes the checkpoint (every key, shape, chunk).
Then write the dist checkpoint tensor by tensor (ualm_nemo/distributed/streaming.py): each tensor is made from
the HF tensors it maps from when the writer reaches it, written, and dropped. Dist checkpoints reshard on load,
so the one TP1 checkpoint serves every layout; ``target_layout`` is checked here so a layout that cannot hold
the model fails now, not on the cluster.

Memory: one Megatron tensor in flight (the largest: the text embedding or head table, ~1.1 GB for the 7B in
bf16; its HF rows are read straight into it), plus what the model build initialises itself: the small UALM
parts (stream embedding / codebook heads, audio adapter) and, when ``model.audio_in.encoder_path`` names a
Qwen2.5-Omni or Audio Flamingo 3 folder, the audio tower (read whole by the model build; only its tensors).

New vocabulary rows (UALM specials, every audio row): ``mean`` of the HF text rows of their table, or
``normal`` N(0, init_std) drawn from a generator seeded by (seed, table): deterministic in any write order.

A UALM export (examples/convert_ualm_to_hf.py: ``ualm_config.json`` + ``audio.safetensors`` + ``audio_encoder/``)
imports whole: the specials and audio rows, the stream heads and the adapter come from ``audio.safetensors``
(checked against the model config first: a file that does not fit is refused, never dropped) and the tower
from ``audio_encoder/``, so UALM -> HF -> UALM -> HF is bit-exact. A plain Qwen2 folder gets the new rows above.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Literal, Mapping

import torch

from ualm_nemo.convert.audio_parts import (ADAPTER_PREFIX, ExportAudioFile, fill_from_export, is_ualm_export,
                                          part_of)
from ualm_nemo.convert.configs import config_to_dict
from ualm_nemo.convert.hf_folder import HFFolder
from ualm_nemo.convert.qwen2_keymap import check_compatible, map_one, megatron_sources, resolve_hf_sources
from ualm_nemo.model.config import ConfigError, UALMConfig

log = logging.getLogger(__name__)
NewRowsInit = Literal["mean", "normal"]


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled)


def check_import(hf_dir: str | Path, cfg: UALMConfig, target_layout: tuple[int, int] = (1, 1)) -> HFFolder:
    """Every check that needs no model: files, HF config vs UALM config, tensor names and shapes, the layout."""
    tp, pp = target_layout
    cfg.with_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                      sequence_parallel=False).validate()
    folder = HFFolder(hf_dir)
    from transformers import Qwen2Config

    hf_config = Qwen2Config.from_dict(folder.config)
    try:
        check_compatible(hf_config, cfg)
    except ValueError as err:
        raise ConfigError(f"{folder.path / 'config.json'}: {err}") from err
    if bool(folder.config.get("tie_word_embeddings")) != cfg.backbone.tie_word_embeddings_in_source:
        log.info("HF tie_word_embeddings=%s, model.backbone.tie_word_embeddings_in_source=%s: the head is taken from "
                 "lm_head.weight when present, else from the embedding", folder.config.get("tie_word_embeddings"),
                 cfg.backbone.tie_word_embeddings_in_source)
    try:
        resolve_hf_sources(folder.shapes(), cfg)
    except ValueError as err:
        raise ValueError(f"{folder.path}: {err}") from err
    if is_ualm_export(folder.path):
        ExportAudioFile(folder.path, cfg)  # its entries against the config, before any model is built
    return folder


def _row_mean(table: torch.Tensor, block: int = 4096) -> torch.Tensor:
    """Mean of the rows, accumulated in fp32 block by block: no fp32 copy of the table (~2 GB for the 7B; even
    ``mean(dtype=torch.float32)`` makes one)."""
    acc = torch.zeros(table.shape[1:], dtype=torch.float32)
    for start in range(0, table.shape[0], block):
        acc += table[start:start + block].float().sum(dim=0)
    return acc / table.shape[0]


# the four vocabulary tables: (UALM key, the HF tensor whose text rows seed its new rows, is the text table)
VOCAB_TABLES = {"embedding.text.weight": ("model.embed_tokens.weight", True),
                "heads.text_head.weight": ("lm_head.weight", True),
                "embedding.audio.weight": ("model.embed_tokens.weight", False),
                "heads.audio_head.weight": ("lm_head.weight", False)}


def table_generator(seed: int, key: str) -> torch.Generator:
    """The generator of one table's ``normal`` rows: fixed by (seed, table), whatever order tables are made in."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))


@torch.no_grad()
def fill_new_rows(key: str, table: torch.Tensor, cfg: UALMConfig, how: NewRowsInit, text_mean: torch.Tensor | None,
                  generator: torch.Generator | None = None) -> None:
    """Set the rows of one vocabulary table (``VOCAB_TABLES``) that HF has no weights for, in place.

    New rows are the UALM specials of a text table and every row of an audio table. ``mean``: each set to
    ``text_mean``, the mean of the HF text rows of the matching text table (a common choice when growing a
    vocabulary: new tokens start as an "average token" and do not dominate the softmax); ``normal``: drawn from
    N(0, model.init_std) with ``generator`` (in fp32, then cast), or left as they are without one. Vocabulary
    padding rows are zeroed (they are masked in the heads and never looked up).
    """
    if how not in ("mean", "normal"):
        raise ConfigError(f"new_rows_init={how!r}: choose 'mean' or 'normal'")
    if key not in VOCAB_TABLES:
        raise KeyError(f"{key!r} is not a vocabulary table ({sorted(VOCAB_TABLES)})")
    is_text = VOCAB_TABLES[key][1]
    lo, hi = (cfg.backbone.text_vocab_size, cfg.num_text_rows) if is_text else (0, cfg.num_audio_rows)
    table[hi:] = 0
    rows = table[lo:hi]
    if how == "mean":
        if text_mean is None:
            raise ValueError(f"{key}: new_rows_init=mean needs the mean of the HF text rows")
        rows.copy_(text_mean.to(table.dtype).expand_as(rows))
    elif generator is not None:
        rows.copy_(torch.empty(rows.shape, dtype=torch.float32).normal_(0.0, cfg.init_std, generator=generator))


def _megatron_initialised_keys(model: torch.nn.Module) -> set[str]:
    """State-dict keys of the tensors Megatron's ``perform_initialization`` would have initialised."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

    kinds = (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)
    return {f"{name}.{p}" for name, module in model.named_modules() if isinstance(module, kinds)
            for p, value in module.named_parameters(recurse=False) if value is not None}


class ImportSource:
    """Makes each tensor of the UALM checkpoint on demand: ``resolve(key)`` (see streaming.save_streamed).

    Backbone tensors come from the HF folder through the key map, the four vocabulary tables from HF rows plus
    new rows, everything else (UALM's own small parts, the audio encoder) from the model as it was built.
    """

    def __init__(self, folder: HFFolder, cfg: UALMConfig, own: Mapping[str, torch.Tensor], new_rows_init: NewRowsInit,
                 seed: int) -> None:
        if new_rows_init not in ("mean", "normal"):
            raise ConfigError(f"new_rows_init={new_rows_init!r}: choose 'mean' or 'normal'")
        self.folder, self.cfg, self.own, self.how, self.seed = folder, cfg, own, new_rows_init, seed
        self.hf_key_of = resolve_hf_sources(folder.shapes(), cfg)  # expected HF key -> key to read it from
        self.backbone = megatron_sources(cfg)
        self._means: dict[str, torch.Tensor] = {}
        self.audio = ExportAudioFile(folder.path, cfg) if is_ualm_export(folder.path) else None
        if self.audio is not None and cfg.audio_in.enabled:  # the adapter's input width is the built tower's
            self.audio.check(cfg, encoder_dim=own[ADAPTER_PREFIX + "fc1.weight"].shape[1])

    def check_covers(self, must_be_made: set[str]) -> None:
        """Every tensor the model left uninitialised must be made here (no random memory in the checkpoint)."""
        left = sorted(must_be_made - set(self.backbone) - set(VOCAB_TABLES))
        if left:
            raise RuntimeError(f"import would leave Megatron tensors uninitialised (not in the HF key map, not a "
                               f"vocabulary table): {left[:8]}")

    def _read(self, hf_key: str, dtype: torch.dtype) -> torch.Tensor:
        return self.folder.get(self.hf_key_of[hf_key]).to(dtype)

    def _text_mean(self, hf_key: str, dtype: torch.dtype, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Mean of the HF text rows (after the cast to the model dtype), computed once per HF tensor."""
        if hf_key not in self._means:
            self._means[hf_key] = _row_mean(rows if rows is not None else self._read(hf_key, dtype))
        return self._means[hf_key]

    def _table(self, key: str) -> torch.Tensor:
        hf_key, is_text = VOCAB_TABLES[key]
        like = self.own[key]
        table = torch.zeros(like.shape, dtype=like.dtype)
        mean_from = None
        if is_text:
            hf_rows = table[: self.cfg.backbone.text_vocab_size]
            if self.folder.dtype(self.hf_key_of[hf_key]) == table.dtype:
                self.folder.get(self.hf_key_of[hf_key], out=hf_rows)  # read straight into the table
            else:
                hf_rows.copy_(self._read(hf_key, table.dtype))
            mean_from = hf_rows
        if self.audio is not None:  # an export's own rows; padding rows stay zero
            fill_from_export(key, table, self.audio, self.cfg)
            return table
        mean = self._text_mean(hf_key, table.dtype, mean_from) if self.how == "mean" else None
        fill_new_rows(key, table, self.cfg, self.how, mean, table_generator(self.seed, key))
        return table

    def resolve(self, key: str) -> torch.Tensor:
        if key in VOCAB_TABLES:
            return self._table(key)
        if key in self.backbone:
            rule, hf_keys = self.backbone[key]
            dtype = self.own[key].dtype
            return map_one(rule, tuple(self._read(k, dtype) for k in hf_keys), self.cfg)
        name = part_of(key) if self.audio is not None else None
        if name is not None:
            return self.audio.get(name).to(self.own[key].dtype)
        return self.own[key]  # built and initialised by the model itself (see check_covers)


def import_hf_checkpoint(hf_dir: str | Path, out_root: str | Path, cfg: UALMConfig, *,
                         new_rows_init: NewRowsInit = "mean", target_layout: tuple[int, int] = (1, 1),
                         overwrite: bool = False, progress: bool = True, seed: int | None = None) -> Path:
    """Write ``out_root/iter_0000000`` (+ ``latest``) from an HF Qwen2 folder. Returns the iteration folder.

    Must run where torch.distributed is initialised (``init_distributed()``); collective: every rank builds
    the same TP1 model description and joins the save (one process is the normal case; rank 0 writes).
    """
    from ualm_nemo.distributed import checkpoint
    from ualm_nemo.distributed.parallel import init_model_parallel
    from ualm_nemo.model.builder import build_model

    out_root = Path(out_root)
    if checkpoint.find_latest(out_root) is not None and not overwrite:
        raise FileExistsError(f"{out_root} already holds a checkpoint (pass overwrite / --overwrite to replace it)")
    folder = check_import(hf_dir, cfg, target_layout)
    # conversion always builds the local (pure torch) spec: its dist-checkpoint keys are the TE spec's, so
    # the result loads into Transformer Engine training unchanged (megatron maps the fused-norm names)
    cfg1 = cfg.without_training_features().with_parallel(
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1, sequence_parallel=False, transformer_impl="local")
    seed = cfg.seed if seed is None else seed
    init_model_parallel(cfg1.parallel, seed=seed)
    model = build_model(cfg1, initialize=False, device="cpu")  # Megatron tensors: allocated, never touched
    own = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    source = ImportSource(folder, cfg, own, new_rows_init, seed)
    source.check_covers(_megatron_initialised_keys(model))
    common = {"ualm_config": config_to_dict(cfg1), "scheduler": None,
              "imported_from": {"hf": str(Path(hf_dir).resolve()), "new_rows_init": new_rows_init}}
    with _progress(len(own), "import", progress) as bar:
        def resolve(key: str) -> torch.Tensor:
            tensor = source.resolve(key)
            bar.update(1)
            return tensor

        log.info("writing %s tensor by tensor", out_root)
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

        try:
            path = checkpoint.save_checkpoint(out_root, 0, [model], None, common=common, resolve=resolve)
        except CheckpointException as err:  # nothing was published: iter_0000000.tmp is left, 'latest' untouched
            raise RuntimeError(f"import into {out_root} failed: {checkpoint.error_cause(err)}") from err
    folder.close()
    return path


def with_encoder(cfg: UALMConfig, encoder_path: str | None) -> UALMConfig:
    """``cfg`` with the audio encoder read from ``encoder_path`` (a Qwen2.5-Omni or encoder-only folder)."""
    if encoder_path is None:
        return cfg
    return replace(cfg, audio_in=replace(cfg.audio_in, enabled=True, encoder_path=str(encoder_path),
                                        random_encoder=False))
