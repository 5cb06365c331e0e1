"""UALM distributed checkpoint (any TP/PP) -> HF folder: Qwen2ForCausalLM + the audio parts beside it.

Route: build the TP1/PP1 model in this process and load the checkpoint into it (dist checkpoints reshard on
load, so any saved layout works), then stream tensors out through the key map into safetensors shards of at
most ``max_shard_bytes`` (each tensor is written to its shard file as it is produced, then dropped). Everything goes to
``<out>.tmp-<pid>`` first and is renamed to ``<out>`` at the end (see hf_folder.atomic_folder).

Memory: the model (whole, in its checkpoint dtype; built without random init, then loaded) plus the tensors of
one key-map rule in flight (at most: the text embedding's rows, or one layer's q/k/v or gate/up split).
Layout of the result: see audio_parts.py.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

import torch

from ualm_nemo.convert.audio_parts import (AUDIO_FILE, ENCODER_DIR, UALM_CONFIG_FILE, audio_parts, encoder_state)
from ualm_nemo.convert.configs import check_same_model, config_to_dict
from ualm_nemo.convert.hf_folder import TOKENIZER_FILES, ShardedWriter, atomic_folder, copy_tokenizer_files
from ualm_nemo.distributed.checkpoint import resolve_checkpoint, stored_model_config
from ualm_nemo.convert.qwen2_keymap import expected_hf_shapes, iter_ualm_to_hf, qwen2_config_for
from ualm_nemo.model.config import ConfigError, UALMConfig, padded

log = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '100KB' or a byte count -> bytes (decimal units, as transformers' max_shard_size)."""
    if isinstance(text, int):
        return text
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    norm = text.strip().upper()
    for unit, scale in units.items():
        number = norm[: -len(unit)].strip()
        if norm.endswith(unit) and number.replace(".", "", 1).isdigit() and float(number) > 0:
            return int(float(number) * scale)
    if norm.isdigit() and int(norm) > 0:
        return int(norm)
    raise ValueError(f"max shard size {text!r}: give a positive byte count or a number with KB/MB/GB")


def write_hf_folder(state: Mapping[str, Any], cfg: UALMConfig, out: str | Path, *,
                    encoder_config: Any | None = None, tokenizer_dir: str | Path | None = None,
                    dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 10**9, overwrite: bool = False,
                    progress: bool = True) -> Path:
    """Write the HF folder from a full TP1/PP1 UALM state dict (pure: no process groups needed).

    ``encoder_config``: the audio tower's HF config (needed when ``cfg.audio_in.enabled``); ``dtype``: cast
    every tensor (default: keep each tensor's dtype).
    """
    from tqdm import tqdm

    if cfg.audio_in.enabled and encoder_config is None:
        raise ValueError("model.audio_in.enabled=true: the audio tower's config (encoder_config) is needed to "
                         "write audio_encoder/")

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(dtype) if dtype is not None else t.detach()

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(out, overwrite) as tmp:
        writer = ShardedWriter(tmp, max_shard_bytes)
        try:
            bar = tqdm(total=len(expected_hf_shapes(cfg)), desc="export", unit="tensor", disable=not progress)
            for key, tensor in iter_ualm_to_hf(state, cfg):
                writer.add(key, cast(tensor))  # written to the shard file now, nothing kept
                bar.update(1)
            bar.close()
            writer.finish()
        finally:
            writer.close()
        model_dtype = dtype or {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.params_dtype]
        hf_config = qwen2_config_for(cfg, architectures=["Qwen2ForCausalLM"])
        hf_config.dtype = _TORCH_DTYPE_NAMES.get(model_dtype, "float32")
        hf_config.save_pretrained(tmp)
        from safetensors.torch import save_file

        save_file({k: cast(v).contiguous() for k, v in audio_parts(state, cfg).items()}, str(tmp / AUDIO_FILE),
                  metadata={"format": "pt"})
        exported = replace(cfg, parallel=replace(cfg.parallel, tensor_model_parallel_size=1,
                                                 pipeline_model_parallel_size=1, sequence_parallel=False))
        if cfg.audio_in.enabled:
            enc = tmp / ENCODER_DIR
            enc.mkdir()
            encoder_config.save_pretrained(enc)
            save_file({k: cast(v).contiguous() for k, v in encoder_state(state).items()},
                      str(enc / "model.safetensors"), metadata={"format": "pt"})
            # relative: the folder can move; hf_ualm resolves it against the folder
            exported = replace(exported, audio_in=replace(cfg.audio_in, encoder_path=ENCODER_DIR))
        (tmp / UALM_CONFIG_FILE).write_text(json.dumps(config_to_dict(exported), indent=2) + "\n")
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp)
        else:
            log.warning("no tokenizer folder given: %s has no tokenizer files", out)
    return out


@torch.no_grad()
def fold_text_padding_overlap(model, cfg: UALMConfig) -> dict[str, Any]:
    """The model's state dict, with what its embedding really computes for the first audio ids folded in.

    ualm_nemo/model/embedding.py (as of 2026-11-23) looks every id up in both tables; the text table is padded
    to ``padded(num_text_rows)`` rows, so audio ids below that bound also pick up a text *padding* row (trained,
    since gradients reach it). The HF export has no padding rows, so those rows are added to the audio rows
    they shadow. Probed, not assumed: once the embedding is fixed the probe sees no overlap and nothing changes.
    """
    state = dict(model.state_dict())
    off, end = cfg.vocab.audio_offset, padded(cfg.num_text_rows)
    if model.embedding is None or end <= off:
        return state
    text, audio = state["embedding.text.weight"], state["embedding.audio.weight"]
    probe = torch.tensor([cfg.vocab.text_position_streams(0)])[None]  # [1, 1, N]
    probe[..., 0] = end - 1  # an audio id (codebook 0) in the overlap
    got = model.embedding(probe)[0, 0]
    if torch.equal(got, audio[end - 1 - off]):
        return state
    if not torch.allclose(got, audio[end - 1 - off] + text[end - 1]):
        raise RuntimeError("the model's embedding of an audio id is neither its audio row nor audio + text padding "
                           "row: the exporter does not know this embedding's semantics")
    log.warning("folding %d text-table padding rows into the audio rows they overlap (see embedding.py)", end - off)
    folded = audio.clone()
    folded[: end - off] += text[off:end]
    state["embedding.audio.weight"] = folded
    return state


def _first_cause(err: BaseException) -> str:
    """The line that names the problem in a (multi-rank, traceback-laden) checkpoint error."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    causes = [ln for ln in lines if ("Exception:" in ln or "Error:" in ln) and not ln.startswith("Traceback")]
    return (causes[0] if causes else (lines[0] if lines else type(err).__name__))[:500]


def prepare_export(ckpt: str | Path, out: str | Path, cfg: UALMConfig | None, tokenizer_dir: str | Path | None,
                   dtype: str | None, overwrite: bool) -> tuple[Path, UALMConfig, str | Path | None]:
    """Every check that needs no model. Returns (iteration folder, model config, tokenizer folder or None)."""
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r}: choose one of {sorted(DTYPES)}")
    if Path(out).exists() and not overwrite:
        raise FileExistsError(f"output {out} already exists (pass overwrite / --overwrite to replace it)")
    iteration = resolve_checkpoint(ckpt)
    stored = stored_model_config(iteration)
    if cfg is None and stored is None:
        raise ConfigError(f"{iteration} records no model config: give one (--model NAME|YAML|ualm_config.json)")
    if cfg is not None and stored is not None:
        check_same_model(stored, cfg)
    if tokenizer_dir is None:  # an import records its HF source, which holds the tokenizer
        common = torch.load(iteration / "ualm_common.pt", weights_only=False)
        source = (common.get("imported_from") or {}).get("hf")
        has_files = source and any((Path(source) / name).is_file() for name in TOKENIZER_FILES)
        tokenizer_dir = source if has_files else None
    elif not Path(tokenizer_dir).is_dir():
        raise FileNotFoundError(f"tokenizer folder {tokenizer_dir} does not exist")
    return iteration, cfg or stored, tokenizer_dir


def export_hf_checkpoint(ckpt: str | Path, out: str | Path, cfg: UALMConfig | None = None, *,
                         tokenizer_dir: str | Path | None = None, dtype: str | None = None,
                         max_shard_bytes: int = 5 * 10**9, overwrite: bool = False, progress: bool = True) -> Path:
    """Export a checkpoint (a run's checkpoint folder or one ``iter_*``) saved at any layout to an HF folder.

    ``cfg``: the model config; optional when the checkpoint records one (imports do). Must run where
    torch.distributed is initialised; every rank loads, rank 0 writes.
    """
    import torch.distributed as dist

    from ualm_nemo.distributed import checkpoint
    from ualm_nemo.distributed.parallel import init_model_parallel
    from ualm_nemo.model.builder import build_model

    iteration, cfg, tokenizer_dir = prepare_export(ckpt, out, cfg, tokenizer_dir, dtype, overwrite)
    # conversion always builds the local (pure torch) spec: its dist-checkpoint keys are the TE spec's, so
    # the result loads into Transformer Engine training unchanged (megatron maps the fused-norm names)
    cfg1 = cfg.with_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, sequence_parallel=False,
                             transformer_impl="local")
    init_model_parallel(cfg1.parallel, seed=cfg.seed)
    model = build_model(cfg1, initialize=False)  # no random init: the load overwrites every tensor
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    try:
        checkpoint.load_checkpoint(iteration, [model], None, restore_rng=False)
    except (Exception, CheckpointException) as err:
        raise ValueError(f"could not load {iteration} into the given model config (backbone {cfg.backbone}, "
                         f"audio_in={cfg.audio_in}, audio_out.head={cfg.audio_out.head!r}): does the config match "
                         f"the checkpoint? Cause: {_first_cause(err)}") from err
    encoder_config = model.audio_input.encoder.tower.config if model.audio_input is not None else None
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        write_hf_folder(fold_text_padding_overlap(model, cfg1), cfg1, out, encoder_config=encoder_config, tokenizer_dir=tokenizer_dir,
                        dtype=DTYPES[dtype] if dtype else None, max_shard_bytes=max_shard_bytes,
                        overwrite=overwrite, progress=progress)
    if dist.is_initialized():
        dist.barrier()
    return Path(out)
