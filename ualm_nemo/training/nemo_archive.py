"""``.nemo`` archives of a UALMModel: NeMo's own format (a tar of ``model_config.yaml`` + the weights), holding
the weights in NeMo's *sharded* layout for Megatron models.

Layout of ``x.nemo`` (an uncompressed tar, as NeMo writes it)::

    model_config.yaml        the NeMo ``cfg``: the whole run config (model section under ``ualm``), ``target``
    model_weights/           a ualm_nemo iteration folder: Megatron dist checkpoint (torch_dist) of the model
                             weights, no optimizer state, and ualm_common.pt (UALMConfig, step, tokenizer)

Why the sharded layout (NeMo's ``model_weights/`` folder, as its Megatron models write with dist checkpoints)
rather than one ``model_weights.ckpt`` state dict: the files carry each tensor's global shape, so an archive
written at any TP/PP restores at any other (the loader reshards), every rank writes its own shards (no gather of
a 7B model on rank 0), and ``model_weights/`` is exactly what ``distributed/checkpoint.py`` and the converters
already read (``examples/convert_ualm_to_hf.py x.nemo out/``). ``save_to`` is collective (every rank calls it);
the shards are staged next to the archive (``<x.nemo>.tmp-weights``: a folder every rank reaches) and rank 0
packs them. Not supported, and refused by name: unpacked archives (``pack_nemo_file=False``), ``strict=False``
(every weight is always loaded), archives written by another NeMo model.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from nemo.core.connectors.save_restore_connector import SaveRestoreConnector

WEIGHTS_DIR = "model_weights"  # NeMo's name for the sharded weights folder inside a .nemo
CONFIG_FILE = "model_config.yaml"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def is_nemo_archive(path: str | Path) -> bool:
    return Path(path).suffix == ".nemo" and Path(path).is_file()


@contextlib.contextmanager
def extracted_archive(path: str | Path) -> Iterator[Path]:
    """A ``.nemo`` unpacked into a temporary folder (this rank's own: every rank reads a local copy), removed
    afterwards. ValueError when it is not a UALM archive."""
    import tarfile

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    with tempfile.TemporaryDirectory(prefix="ualm_nemo_") as tmp:
        try:
            SaveRestoreConnector._unpack_nemo_file(str(path), tmp)
        except (tarfile.TarError, EOFError, OSError) as err:
            raise ValueError(f"{path} is not a readable .nemo archive (a tar): {err}") from None
        folder = Path(tmp)
        if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_DIR / "ualm_common.pt").is_file():
            raise ValueError(f"{path} is not a UALM .nemo archive: it lacks {CONFIG_FILE} or {WEIGHTS_DIR}/ "
                             "(write one with UALMModel.save_to)")
        yield folder


@contextlib.contextmanager
def archive_weights(path: str | Path) -> Iterator[Path]:
    """The ``model_weights/`` iteration folder of a ``.nemo`` (what the checkpoint loaders and converters read)."""
    with extracted_archive(path) as folder:
        yield folder / WEIGHTS_DIR


class UALMSaveRestoreConnector(SaveRestoreConnector):
    """NeMo's save/restore for UALMModel: the weights as a sharded Megatron checkpoint (see the module docstring)."""

    def save_to(self, model, save_path: str) -> str | None:
        """Collective: every rank writes its shards, rank 0 packs ``model_config.yaml`` + ``model_weights/``.
        The archive appears whole or not at all (written as ``<path>.tmp-<pid>``, then renamed)."""
        if not self.pack_nemo_file:
            raise ValueError("UALMModel archives are always packed: pack_nemo_file=False is not supported")
        if model.engine is None:
            raise RuntimeError("UALMModel.save_to: the model has no weights yet (call configure_model(), or train "
                               "it, or restore it, first)")
        save_path = str(Path(save_path).expanduser().resolve())
        staging = Path(f"{save_path}.tmp-weights")  # beside the archive: a folder every rank's shards reach
        if _rank() == 0:
            shutil.rmtree(staging, ignore_errors=True)
        _barrier()
        iteration = model.engine.save_weights(staging, model.archive_extra())
        if _rank() == 0:
            self._pack(model, iteration, save_path)
            shutil.rmtree(staging, ignore_errors=True)
        _barrier()
        return save_path if _rank() == 0 else None

    def _pack(self, model, iteration: Path, save_path: str) -> None:
        Path(save_path).parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=Path(save_path).parent, prefix=".nemo-pack-") as tmp:
            model.to_config_file(path2yaml_file=str(Path(tmp) / CONFIG_FILE))
            weights = Path(tmp) / WEIGHTS_DIR
            shutil.move(str(iteration), weights)
            for per_rank in weights.glob("rank_*.pt"):  # a run's RNG state: no part of a model archive
                per_rank.unlink()
            partial = f"{save_path}.tmp-{os.getpid()}"
            self._make_nemo_file_from_folder(filename=partial, source_dir=tmp)
            os.replace(partial, save_path)

    def restore_from(self, calling_cls, restore_path: str, override_config_path=None, map_location=None,
                     strict: bool = True, return_config: bool = False, trainer=None,
                     validate_access_integrity: bool = True):
        """Rebuild the model from ``model_config.yaml`` (or ``override_config_path``) and load
        ``model_weights/`` at this process's layout (see ``UALMModel.load_archive_weights``). ``map_location``
        is not used: Megatron places the weights (the GPU when there is one)."""
        if not strict:
            raise ValueError("UALMModel.restore_from(strict=False) is not supported: a UALM archive always loads "
                             "every weight (use train.init_from with a checkpoint for partial starts)")
        with extracted_archive(restore_path) as folder:
            conf = self._config(folder, override_config_path)
            if return_config:
                return conf
            calling_cls._set_model_restore_state(is_being_restored=True, folder=str(folder))
            try:
                # NeMo's from_config_dict refuses targets outside nemo.*: build the calling class directly
                instance = calling_cls(cfg=conf, trainer=trainer)
                instance.load_archive_weights(folder / WEIGHTS_DIR)
            finally:
                calling_cls._set_model_restore_state(is_being_restored=False)
        return instance

    def _config(self, folder: Path, override) -> DictConfig:
        if override is None:
            return OmegaConf.load(folder / CONFIG_FILE)
        return override if isinstance(override, DictConfig) else OmegaConf.load(override)
