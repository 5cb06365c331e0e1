"""HF Qwen2.5 folder -> UALM distributed checkpoint (model weights only, step 0), loadable at any TP/PP.

Route: build the full TP1/PP1 UALM model in this process *without* Megatron's weight initialisation (every
Megatron tensor is overwritten below, so its random init -- a full fp32 master copy per layer -- would be
wasted memory and time), stream the HF tensors in one at a time through the key map (each copied into its
parameter, then dropped), initialise the new vocabulary rows (deterministically, from the seed), check that no
Megatron tensor was left uninitialised, and save a Megatron dist checkpoint. Dist checkpoints reshard on load, so the one
TP1 checkpoint serves every layout; ``target_layout`` is checked here so a layout that cannot hold the model
fails now, not on the cluster.

Memory: the model (in ``params_dtype``) plus one HF shard's mapped pages plus one tensor in flight (the text
tables' transform holds a second copy of one table while it is written). The model
itself is whole in this process: a 7B import at bf16 needs ~16 GB (fp32: ~31 GB).

The audio encoder, when ``model.audio_in.encoder_path`` names a Qwen2.5-Omni folder, is read by the model
build itself (only the ``thinker.audio_tower.*`` tensors) and lands in the checkpoint with the rest.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch

from ualm_nemo.convert.configs import config_to_dict
from ualm_nemo.convert.hf_folder import HFFolder
from ualm_nemo.convert.qwen2_keymap import check_compatible, iter_hf_to_ualm, num_mapped_tensors, resolve_hf_sources
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
    return folder


def _row_mean(table: torch.Tensor, block: int = 4096) -> torch.Tensor:
    """Mean of the rows, accumulated in fp32 block by block: no fp32 copy of the table (~2 GB for the 7B; even
    ``mean(dtype=torch.float32)`` makes one)."""
    acc = torch.zeros(table.shape[1:], dtype=torch.float32)
    for start in range(0, table.shape[0], block):
        acc += table[start:start + block].float().sum(dim=0)
    return acc / table.shape[0]


@torch.no_grad()
def init_new_rows(state: dict[str, Any], cfg: UALMConfig, how: NewRowsInit,
                  generator: torch.Generator | None = None) -> None:
    """Rows HF has no weights for: the UALM specials and every audio row, in the embedding and the head.

    ``mean``: each set to the mean of the HF text rows of its table (a common choice when growing a vocabulary:
    new tokens start as an "average token" and do not dominate the softmax); ``normal``: kept as initialised
    (N(0, model.init_std)) -- or, given ``generator``, drawn from N(0, model.init_std) with it here, for a model
    built without initialisation (in a fixed order: text embedding, text head, audio embedding, audio head;
    drawn in fp32, then cast). Vocabulary padding rows are zeroed: they are masked in the heads, and the embedding
    currently adds the text table's padding rows to the first audio ids (see exporter.fold_text_padding_overlap).
    """
    if how not in ("mean", "normal"):
        raise ConfigError(f"new_rows_init={how!r}: choose 'mean' or 'normal'")
    v, t, a = cfg.backbone.text_vocab_size, cfg.num_text_rows, cfg.num_audio_rows
    for key, real in (("embedding.text.weight", t), ("heads.text_head.weight", t), ("embedding.audio.weight", a),
                      ("heads.audio_head.weight", a)):
        state[key][real:] = 0
    if how == "normal":
        if generator is not None:
            for key, lo, hi in (("embedding.text.weight", v, t), ("heads.text_head.weight", v, t),
                                ("embedding.audio.weight", 0, a), ("heads.audio_head.weight", 0, a)):
                rows = state[key][lo:hi]
                rows.copy_(torch.empty(rows.shape, dtype=torch.float32).normal_(0.0, cfg.init_std,
                                                                                generator=generator))
        return
    for text_key, audio_key in (("embedding.text.weight", "embedding.audio.weight"),
                                ("heads.text_head.weight", "heads.audio_head.weight")):
        mean = _row_mean(state[text_key][:v]).to(state[text_key].dtype)
        state[text_key][v:t] = mean
        state[audio_key][:a] = mean


_NEW_ROW_TABLES = ("embedding.text.weight", "heads.text_head.weight", "embedding.audio.weight",
                   "heads.audio_head.weight")  # every row set by the HF map or init_new_rows


def _megatron_initialised_keys(model: torch.nn.Module) -> set[str]:
    """State-dict keys of the tensors Megatron's ``perform_initialization`` would have initialised."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

    kinds = (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)
    return {f"{name}.{p}" for name, module in model.named_modules() if isinstance(module, kinds)
            for p, value in module.named_parameters(recurse=False) if value is not None}


def _check_all_initialised(model: torch.nn.Module, filled: set[str]) -> None:
    """The model was built without initialisation: every Megatron tensor must have been filled."""
    left = sorted(_megatron_initialised_keys(model) - filled)
    if left:
        raise RuntimeError(f"import left Megatron tensors uninitialised (not in the HF key map, not new rows): "
                           f"{left[:8]}")


def import_hf_checkpoint(hf_dir: str | Path, out_root: str | Path, cfg: UALMConfig, *,
                         new_rows_init: NewRowsInit = "mean", target_layout: tuple[int, int] = (1, 1),
                         overwrite: bool = False, progress: bool = True, seed: int | None = None) -> Path:
    """Write ``out_root/iter_0000000`` (+ ``latest``) from an HF Qwen2 folder. Returns the iteration folder.

    Must run where torch.distributed is initialised (``init_distributed()``); every rank builds the same TP1
    model and the checkpoint is written collectively (one process is the normal case).
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
    cfg1 = cfg.with_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, sequence_parallel=False,
                             transformer_impl="local")
    seed = cfg.seed if seed is None else seed
    init_model_parallel(cfg1.parallel, seed=seed)
    model = build_model(cfg1, initialize=False)  # Megatron tensors: allocated, not initialised (filled below)
    state = model.state_dict()  # detached views of the parameters: writing into them writes the model
    sources = resolve_hf_sources(folder.shapes(), cfg)
    written = set()
    with _progress(num_mapped_tensors(cfg), "import", progress) as bar:
        for key, tensor in iter_hf_to_ualm(folder.get, sources, cfg, state, in_place=True):
            with torch.no_grad():
                if tensor is not state[key]:  # in_place: the text tables are written already
                    state[key].copy_(tensor)
            written.add(key)
            bar.update(1)
    folder.close()
    init_new_rows(state, cfg, new_rows_init, generator=torch.Generator().manual_seed(seed))
    _check_all_initialised(model, written | set(_NEW_ROW_TABLES))
    common = {"ualm_config": config_to_dict(cfg1), "scheduler": None,
              "imported_from": {"hf": str(Path(hf_dir).resolve()), "new_rows_init": new_rows_init}}
    log.info("saving %s", out_root)
    return checkpoint.save_checkpoint(out_root, 0, [model], None, common=common)


def load_initial_weights(engine, path: str | Path) -> dict[str, Any]:
    """Load model weights only (any saved layout -> the engine's layout) to start a run from, e.g. an import.

    The engine's step stays 0 and its optimizer / scheduler stay fresh; the optimizer's fp32 main copies (bf16
    training) are refreshed from the loaded weights, or its first step would revert to the random init.
    """
    from ualm_nemo.distributed import checkpoint

    iteration = checkpoint.resolve_checkpoint(path)
    stored = checkpoint.stored_model_config(iteration)
    if stored is not None:
        from ualm_nemo.convert.configs import check_same_model

        check_same_model(stored, engine.cfg)
    state = checkpoint.load_checkpoint(iteration, engine.chunks, None, restore_rng=False)
    if engine.optimizer is not None:
        engine.optimizer.reload_model_params()
    return state


def with_encoder(cfg: UALMConfig, encoder_path: str | None) -> UALMConfig:
    """``cfg`` with the audio encoder read from ``encoder_path`` (a Qwen2.5-Omni or encoder-only folder)."""
    if encoder_path is None:
        return cfg
    return replace(cfg, audio_in=replace(cfg.audio_in, enabled=True, encoder_path=str(encoder_path)))
