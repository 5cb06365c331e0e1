"""UALM distributed checkpoint (any TP/PP) -> HF folder: Qwen2ForCausalLM + the audio parts beside it.

Route: build the TP1/PP1 model without initialisation (its memory is never touched: it only describes the
checkpoint), check every tensor's global shape against the checkpoint's metadata, then stream: each tensor is
loaded alone from the dist checkpoint (any saved layout; the loader reads just the chunks it needs, see
ualm_nemo/distributed/streaming.py), mapped to its HF tensors, written into a safetensors shard of at most
``max_shard_bytes``, and dropped. Everything goes to ``<out>.tmp-<host>-<pid>`` first and is renamed to ``<out>`` at
the end (see hf_folder.atomic_folder).

Memory: one checkpoint tensor plus the HF tensors made from it (at most: the text embedding table and its text
rows, ~2.2 GB for the 7B in bf16). Layout of the result: see audio_parts.py.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from ualm_nemo.convert.audio_parts import (ADAPTER_PREFIX, AUDIO_FILE, ENCODER_DIR, UALM_CONFIG_FILE, encoder_keys,
                                          expected_audio_shapes, iter_audio_parts)
from ualm_nemo.convert.configs import config_to_dict
from ualm_nemo.convert.hf_folder import TOKENIZER_FILES, ShardedWriter, atomic_folder, copy_tokenizer_files
from ualm_nemo.convert.model_card import Provenance, read_provenance, write_model_card
from ualm_nemo.distributed.checkpoint import error_cause, resolve_checkpoint, stored_model_config
from ualm_nemo.convert.qwen2_keymap import expected_hf_shapes, iter_ualm_to_hf, qwen2_config_for
from ualm_nemo.distributed.streaming import StreamedCheckpointReader
from ualm_nemo.model.config import ConfigError, UALMConfig, check_same_model

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


ExportTensor = tuple[str, str, torch.Tensor]  # (part: "model" | "audio" | "encoder", name in its file, tensor)


def iter_export(state: Mapping[str, Any], cfg: UALMConfig) -> Iterator[ExportTensor]:
    """Every tensor of the HF folder, one at a time, in writing order, from a full TP1/PP1 UALM state (a dict,
    or a checkpoint reader loading each key when asked)."""
    for key, tensor in iter_ualm_to_hf(state, cfg):
        yield "model", key, tensor
    for name, tensor in iter_audio_parts(state, cfg):
        yield "audio", name, tensor
    for name, key in (encoder_keys(state) if cfg.audio_in.enabled else {}).items():
        yield "encoder", name, state[key]


def num_export_tensors(state: Mapping[str, Any], cfg: UALMConfig) -> int:
    """How many tensors :func:`iter_export` yields (for the progress bar; reads keys only)."""
    adapter = sum(key.startswith(ADAPTER_PREFIX) for key in state.keys())
    encoder = len(encoder_keys(state)) if cfg.audio_in.enabled else 0
    return len(expected_hf_shapes(cfg)) + len(expected_audio_shapes(cfg)) + adapter + encoder


def write_hf_folder(state: Mapping[str, Any], cfg: UALMConfig, out: str | Path, *,
                    encoder_config: Any | None = None, tokenizer_dir: str | Path | None = None,
                    dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 10**9, overwrite: bool = False,
                    progress: bool = True, provenance: Provenance | None = None) -> Path:
    """Write the HF folder from a full TP1/PP1 UALM state (pure: no process groups needed unless ``state``
    loads collectively).

    ``encoder_config``: the audio tower's HF config (needed when ``cfg.audio_in.enabled``); ``dtype``: cast
    every tensor (default: keep each tensor's dtype); ``provenance``: what the model card says the folder came
    from (checkpoint, step, run config).
    """
    from tqdm import tqdm

    if cfg.audio_in.enabled and encoder_config is None:
        raise ValueError("model.audio_in.enabled=true: the audio tower's config (encoder_config) is needed to "
                         "write audio_encoder/")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(out, overwrite) as tmp:
        if cfg.audio_in.enabled:
            (tmp / ENCODER_DIR).mkdir()
        # the backbone in shards of max_shard_bytes; audio.safetensors and the encoder as one file each
        writers = {"model": ShardedWriter(tmp, max_shard_bytes),
                   "audio": ShardedWriter(tmp, 2**62, prefix=AUDIO_FILE.removesuffix(".safetensors")),
                   "encoder": ShardedWriter(tmp / ENCODER_DIR, 2**62)}
        try:
            with tqdm(total=num_export_tensors(state, cfg), desc="export", unit="tensor", disable=not progress) as bar:
                for part, name, tensor in iter_export(state, cfg):
                    writers[part].add(name, tensor.detach().to(dtype) if dtype is not None else tensor.detach())
                    bar.update(1)  # the tensor was written to its file: nothing is kept
            for part, writer in writers.items():
                if part != "encoder" or cfg.audio_in.enabled:
                    writer.finish()
        finally:
            for writer in writers.values():
                writer.close()
        model_dtype = dtype or DTYPES[cfg.params_dtype]
        hf_config = qwen2_config_for(cfg, architectures=["Qwen2ForCausalLM"])
        hf_config.dtype = _TORCH_DTYPE_NAMES.get(model_dtype, "float32")
        hf_config.save_pretrained(tmp)
        exported = cfg.without_training_features().with_parallel(tensor_model_parallel_size=1,
                                                                 pipeline_model_parallel_size=1, sequence_parallel=False)
        if cfg.audio_in.enabled:
            encoder_config.save_pretrained(tmp / ENCODER_DIR)
            # relative: the folder can move; inference.hf_model resolves it against the folder
            exported = replace(exported, audio_in=replace(cfg.audio_in, encoder_path=ENCODER_DIR, random_encoder=False))
        (tmp / UALM_CONFIG_FILE).write_text(json.dumps(config_to_dict(exported), indent=2) + "\n")
        if tokenizer_dir is not None:
            write_tokenizer(tokenizer_dir, tmp)
        else:
            log.warning("no tokenizer folder given: %s has no tokenizer files", out)
        write_model_card(tmp, out.resolve(), exported, provenance)  # last: it lists the files written
    return out


def write_tokenizer(spec: str | Path, dst: Path) -> None:
    """The run's tokenizer into the export: ``byte`` (the demo's, no files) written as a transformers tokenizer
    with the same ids, a folder's tokenizer files copied."""
    if str(spec) == "byte":
        from ualm_nemo.data.tokenizer import save_byte_tokenizer

        save_byte_tokenizer(dst)
    else:
        copy_tokenizer_files(spec, dst)


def recorded_tokenizer(iteration: Path) -> str | None:
    """The tokenizer a checkpoint was made with: the run's ``data.tokenizer`` (training records it), else the
    HF folder an import came from when it holds tokenizer files; None when neither is known or still there."""
    common = torch.load(iteration / "ualm_common.pt", weights_only=False)
    run_tokenizer = common.get("tokenizer")
    if run_tokenizer == "byte":
        return run_tokenizer
    if run_tokenizer:
        if any((Path(run_tokenizer) / name).is_file() for name in TOKENIZER_FILES):
            return run_tokenizer
        log.warning("%s was trained with data.tokenizer=%s, which holds no tokenizer files here: pass --tokenizer",
                    iteration, run_tokenizer)
        return None
    source = (common.get("imported_from") or {}).get("hf")
    return source if source and any((Path(source) / name).is_file() for name in TOKENIZER_FILES) else None


def check_checkpoint_shapes(model: torch.nn.Module, iteration: Path) -> None:
    """Every tensor the model describes is in the checkpoint with the same global shape (before any is read)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    stored = dist_checkpointing.load_tensors_metadata(str(iteration))
    problems = []
    for entry in model.sharded_state_dict(prefix="").values():
        parts = nested_values(entry.build()) if isinstance(entry, ShardedTensorFactory) else [entry]
        for sh in parts:
            if not isinstance(sh, ShardedTensor):
                continue
            if sh.key not in stored:
                problems.append(f"{sh.key} is missing")
            elif tuple(stored[sh.key].global_shape) != tuple(sh.global_shape):
                problems.append(f"{sh.key}: checkpoint {tuple(stored[sh.key].global_shape)}, "
                                f"config {tuple(sh.global_shape)}")
    if problems:
        raise ValueError(f"{iteration} does not match the model config: {'; '.join(sorted(set(problems))[:6])}"
                         f"{' ...' if len(set(problems)) > 6 else ''}")


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
    if tokenizer_dir is None:  # training records data.tokenizer; an import its HF source
        tokenizer_dir = recorded_tokenizer(iteration)
    elif str(tokenizer_dir) != "byte" and not Path(tokenizer_dir).is_dir():
        raise FileNotFoundError(f"tokenizer folder {tokenizer_dir} does not exist")
    return iteration, cfg or stored, tokenizer_dir


def open_checkpoint(iteration: Path,
                    cfg: UALMConfig) -> tuple[UALMConfig, torch.nn.Module, StreamedCheckpointReader]:
    """(TP1/PP1 config, model description, tensor-by-tensor reader) of an iteration folder saved at any layout.

    The model is built without initialisation and never touched; every tensor's global shape is checked
    against the checkpoint first (ValueError naming the keys). Sets up TP1/PP1 parallel state (collective).
    """
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    from ualm_nemo.distributed.parallel import init_model_parallel
    from ualm_nemo.model.builder import build_model

    # conversion always builds the local (pure torch) spec: its dist-checkpoint keys are the TE spec's, so
    # the result loads into Transformer Engine training unchanged (megatron maps the fused-norm names)
    cfg1 = cfg.without_training_features().with_parallel(
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1, sequence_parallel=False, transformer_impl="local")
    init_model_parallel(cfg1.parallel, seed=cfg.seed)
    model = build_model(cfg1, initialize=False, device="cpu")  # describes the checkpoint; never touched
    try:
        check_checkpoint_shapes(model, iteration)
    except (CheckpointException, OSError, RuntimeError) as err:
        raise ValueError(f"could not read {iteration}: {error_cause(err)}") from err
    except ValueError as err:
        raise ValueError(f"{err} (config: backbone {cfg.backbone}, audio_in={cfg.audio_in}, "
                         f"audio_out.head={cfg.audio_out.head!r})") from err
    return cfg1, model, StreamedCheckpointReader(model, iteration)


def export_hf_checkpoint(ckpt: str | Path, out: str | Path, cfg: UALMConfig | None = None, *,
                         tokenizer_dir: str | Path | None = None, dtype: str | None = None,
                         max_shard_bytes: int = 5 * 10**9, overwrite: bool = False, progress: bool = True) -> Path:
    """Export a checkpoint (a run's checkpoint folder or one ``iter_*``) saved at any layout to an HF folder.

    ``cfg``: the model config; optional when the checkpoint records one (imports do). ``dtype``: of every
    written tensor (default: the model's ``params_dtype``; Megatron's local spec keeps RMSNorm weights in fp32
    even in a bf16 model, and an HF folder should be one dtype). Must run where torch.distributed is
    initialised; every rank loads, rank 0 writes.
    """
    import torch.distributed as dist

    iteration, cfg, tokenizer_dir = prepare_export(ckpt, out, cfg, tokenizer_dir, dtype, overwrite)
    cfg1, model, reader = open_checkpoint(iteration, cfg)
    encoder_config = model.audio_input.encoder.tower.config if model.audio_input is not None else None
    if (dist.get_rank() if dist.is_initialized() else 0) == 0:
        write_hf_folder(reader, cfg1, out, encoder_config=encoder_config, tokenizer_dir=tokenizer_dir,
                        dtype=DTYPES[dtype or cfg.params_dtype], max_shard_bytes=max_shard_bytes,
                        overwrite=overwrite, progress=progress,
                        provenance=read_provenance(iteration, tokenizer_dir))
    else:  # checkpoint loads are collective: follow rank 0's reads, write nothing
        for _ in iter_export(reader, cfg1):
            pass
    if dist.is_initialized():
        dist.barrier()
    return Path(out)
