"""Megatron distributed checkpoints: atomic, resumable, reshardable across TP/PP.

Layout of a run's checkpoint folder::

    iter_0000100/            dist_checkpointing (torch_dist) model + optimizer shards, ualm_common.pt, rank_*.pt
    latest                   text file naming the newest complete iter_* folder

A save writes ``iter_N.tmp`` and renames it only after every rank finished, then rewrites ``latest`` with an
atomic replace: a job killed mid-save leaves the previous checkpoint as the latest. ``rank_XXXXX.pt`` holds
per-rank state (RNG, data position) used when the world layout is unchanged.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from ualm_nemo.distributed.checkpoint_check import DamagedCheckpointError, check_checkpoint

_OPT_META = {"distrib_optim_sharding_type": "fully_reshardable"}  # the only format that changes TP on load


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def find_latest(root: str | Path) -> Path | None:
    pointer = Path(root) / "latest"
    if not pointer.exists():
        return None
    path = Path(root) / pointer.read_text().strip()
    return path if path.is_dir() else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A run's checkpoint folder (its ``latest``) or one ``iter_*`` folder -> the iteration folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    latest = find_latest(path)
    if latest is not None:
        check_checkpoint(latest)
        return latest
    if (path / "ualm_common.pt").is_file():
        check_checkpoint(path)
        return path
    if any(path.glob("*.distcp")):  # an iteration folder that lost its ualm_common.pt
        check_checkpoint(path)
    raise FileNotFoundError(f"{path} is neither a ualm_nemo checkpoint folder (iter_*/ualm_common.pt) nor a "
                            "checkpoint root with a 'latest' file; an interrupted save leaves only *.tmp folders")


def error_cause(err: BaseException) -> str:
    """The line that names the problem in a (multi-rank, traceback-laden) dist-checkpoint error."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    causes = [ln for ln in lines if ("Exception:" in ln or "Error:" in ln) and not ln.startswith("Traceback")]
    return (causes[0] if causes else (lines[0] if lines else type(err).__name__))[:500]


def stored_model_config(path: str | Path):
    """The UALMConfig recorded in an iteration folder's ``ualm_common.pt`` (training and imports record it)."""
    from ualm_nemo.model.config import UALMConfig

    stored = torch.load(Path(path) / "ualm_common.pt", weights_only=False).get("ualm_config")
    return UALMConfig.from_dict(stored) if stored else None


def sharded_state(chunks, optimizer, loading: bool) -> dict:
    """``model{i}`` per chunk (the files hold only the tensors' global keys: any chunking loads any other).

    The optimizer maps its states to the model's tensors by identity over the nested dict: merging the chunks'
    dicts into one would drop tensors, as virtual stages reuse local names (each has a ``decoder.layers.0``)."""
    state = {f"model{i}": chunk.sharded_state_dict(prefix="") for i, chunk in enumerate(chunks)}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(dict(state), is_loading=loading, metadata=_OPT_META)
    return state


def rng_state() -> dict:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {"torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(root: str | Path, step: int, chunks, optimizer, common: dict[str, Any],
                    per_rank: dict[str, Any] | None = None, keep_last: int | None = None,
                    resolve: Callable[[str], torch.Tensor] | None = None) -> Path:
    """Save model (+optimizer) shards and ``common`` (rank 0) / ``per_rank`` state for ``step``.

    ``resolve``: write the weights of the one model chunk tensor by tensor, each made by ``resolve(key)``
    when it is written (converters; no optimizer; see streaming.save_streamed). Same files either way.
    The asynchronous save (async_save.py) shares the folder steps below.
    """
    tmp = begin_save(root, step)
    if resolve is None:
        dist_checkpointing.save(sharded_state(chunks, optimizer, loading=False), str(tmp))
    else:
        if optimizer is not None or len(chunks) != 1:
            raise ValueError("a streamed save writes the weights of one model chunk, without optimizer state")
        from ualm_nemo.distributed.streaming import save_streamed

        save_streamed(chunks[0], tmp, resolve, prefix="model0")
    write_small_files(tmp, step, common, per_rank)
    return publish(tmp, keep_last)


def begin_save(root: str | Path, step: int) -> Path:
    """An empty ``iter_N.tmp`` folder on every rank (collective)."""
    from ualm_nemo.compat import mcore_patches

    # no writer-helper server and no forked writer that could outlive a killed trainer
    mcore_patches.apply(("in_process_results", "in_process_writers"))
    tmp = Path(root) / f"iter_{step:07d}.tmp"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    return tmp


def write_small_files(tmp: Path, step: int, common: dict[str, Any], per_rank: dict[str, Any] | None) -> None:
    """This rank's RNG and ``per_rank`` state, and (rank 0) ``common``: taken now, at the step being saved."""
    torch.save({**(per_rank or {}), "rng": rng_state()}, tmp / f"rank_{_rank():05d}.pt")
    if _rank() == 0:
        torch.save({**common, "step": step, "world_size": dist.get_world_size() if dist.is_initialized() else 1},
                   tmp / "ualm_common.pt")


def publish(tmp: Path, keep_last: int | None) -> Path:
    """Once every rank wrote all its files (collective): rename ``iter_N.tmp`` and point ``latest`` at it."""
    root, final = tmp.parent, tmp.with_suffix("")
    _barrier()
    if _rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = root / "latest.tmp"
        pointer.write_text(final.name)
        os.replace(pointer, root / "latest")
        if keep_last:
            _rotate(root, keep_last)
    _barrier()
    return final


def remove_partial(root: str | Path) -> list[Path]:
    """Delete the ``iter_*.tmp`` folders a killed save left (call on one rank, before any save starts)."""
    partial = sorted(p for p in Path(root).glob("iter_*.tmp") if p.is_dir())
    for path in partial:
        shutil.rmtree(path, ignore_errors=True)
    return partial


def _rotate(root: Path, keep_last: int) -> None:
    done = sorted(p for p in root.glob("iter_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: str | Path, chunks, optimizer=None, restore_rng: bool = True) -> dict[str, Any]:
    """Load shards into ``chunks`` (+``optimizer``) at this run's layout; returns common + this rank's state."""
    path = Path(path)
    if not (path / "ualm_common.pt").exists() and not any(path.glob("*.distcp")):
        raise FileNotFoundError(f"{path} is not a complete ualm_nemo checkpoint (no ualm_common.pt)")
    check_checkpoint(path)  # a damaged file is named here, not met as a bare EOFError inside the load
    state = dist_checkpointing.load(sharded_state(chunks, optimizer, loading=True), str(path))
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(state[f"model{i}"])
    if optimizer is not None:
        with torch.no_grad():  # fp32 main params are leaves: copy_ into them needs no_grad
            optimizer.load_state_dict(state["optimizer"])
    common = torch.load(path / "ualm_common.pt", weights_only=False)
    rank_file = path / f"rank_{_rank():05d}.pt"
    same_layout = common.get("world_size") == (dist.get_world_size() if dist.is_initialized() else 1)
    try:
        per_rank = torch.load(rank_file, weights_only=False) if same_layout and rank_file.exists() else {}
    except Exception as e:  # truncated: the weights loaded; the RNG and data position of this rank did not
        raise DamagedCheckpointError(f"checkpoint {path} is damaged: {rank_file}: unreadable ({type(e).__name__}),"
                                     " truncated or corrupt") from None
    if restore_rng and "rng" in per_rank:
        set_rng_state(per_rank["rng"])
    return {**common, "per_rank": per_rank}
