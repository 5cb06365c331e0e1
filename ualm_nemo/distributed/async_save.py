"""Asynchronous checkpoint saves: the step pays for a snapshot, a background thread writes the files.

Why our own writer thread and not megatron's ``AsyncCallsQueue``: its callers fork a writer process
(``TemporalAsyncCaller``) or spawn a persistent one, and a ``kill -9`` of the trainer orphans them (see
compat/mcore_patches.py, fixes 4 and 5). A thread dies with the trainer: a killed save leaves only its
``iter_N.tmp`` folder, which the next start removes (checkpoint.remove_partial).

``start`` (at the step, on every rank, collective):

1. wait for the previous save: two saves never overlap;
2. the sharded state dict, with the optimizer's fully reshardable part deferred (deferred_optimizer_state.py:
   this rank's optimizer shard copied now, the data-parallel gather into the state dict's tensors done by the
   writer thread), then a private copy of every model CPU shard the writer reads: training updates the live
   tensors at the next step (and megatron then copies no tensor twice);
3. megatron's async request (``dist_checkpointing.save(async_sharded_save=True)``): save plan, ``common.pt``,
   write buckets, device shards copied to the host. One strategy object lives across saves, so from the 3rd save
   on the global plan and metadata are reused (``cached_metadata``) instead of gathered; the sharding-integrity
   check (an all-gather of every shard's metadata) runs at the first save only: a run's layout cannot change;
4. the small files (RNG, data position, common), then the writer thread starts.

``poll`` (each step while a save is pending: one tiny all_reduce) and ``wait`` finalize once the writers of all
ranks are done: megatron's finalize (rank 0 writes ``.metadata`` from every rank's write results, then
``metadata.json``), then ``checkpoint.publish`` (rename, ``latest``, rotation). ``latest`` therefore names only
saves complete on every rank. The checkpoint is the same as a synchronous save's (fully reshardable format).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from ualm_nemo.distributed import checkpoint
from ualm_nemo.distributed.deferred_optimizer_state import DeferredGather, SnapshotBuffers, deferred_gather

log = logging.getLogger(__name__)


@dataclass
class SaveTimes:
    """Seconds of the last save: ``stall`` is what the training step paid (without waiting for the previous
    save), split into its parts; ``write`` is the background thread's."""

    waited: float = 0.0
    state_dict: float = 0.0  # the sharded state dict (with a snapshot of this rank's optimizer shard)
    snapshot: float = 0.0  # private copies of the CPU shards
    plan: float = 0.0  # megatron's checks, save plan, common.pt, write buckets (+ device-to-host copies)
    small_files: float = 0.0
    gather: float = 0.0  # the background thread's: the optimizer state gathered (deferred_optimizer_state.py)
    write: float = 0.0  # the background thread's, gather included

    @property
    def stall(self) -> float:
        return self.state_dict + self.plan + self.snapshot + self.small_files


@dataclass
class _Pending:
    tmp: Path
    keep_last: int | None
    finalize_fns: list
    thread: threading.Thread | None


def copy_host_tensors(state: dict, skip: Callable[[torch.Tensor], bool] = lambda tensor: False) -> None:
    """Give every CPU shard of ``state`` private data, in place: training updates the live tensors at the next
    step while the thread writes. Megatron's async writer is a forked process (a copy-on-write snapshot for free);
    a thread needs copies. Made before megatron plans the save: its ``prepare_write_data`` copies views only, and
    these copies are none, so no tensor is copied twice. Device tensors go to the host later (``to_host``)."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    apply_factories(state)  # what megatron does first: the tensors the factories make are the ones written

    def copy(value):
        if (isinstance(value, ShardedTensor) and value.data is not None and value.data.is_cpu
                and not skip(value.data)):
            value.data = value.data.detach().clone()
        return value

    dict_list_map_inplace(copy, state)


def to_host(write_buckets: list) -> list:
    """The buckets with their device tensors copied to the host (CPU ones are private already)."""
    if not torch.cuda.is_available():
        return write_buckets
    moved = [(path, key, (bytes_data, [(item, t.to("cpu", non_blocking=True)) for item, t in tensor_data]))
             for path, key, (bytes_data, tensor_data) in write_buckets]
    torch.cuda.synchronize()  # the non-blocking device-to-host copies have landed
    return moved


class AsyncSaver:
    """At most one save in flight per process; every method is collective (all ranks call it together)."""

    def __init__(self) -> None:
        self.strategy = None  # megatron's TorchDistSaveShardedStrategy, kept for its cached plans
        self.validated = False
        self.pending: _Pending | None = None
        self.snapshot_buffers: SnapshotBuffers = {}  # this rank's optimizer shard, copied at each save
        self.times = SaveTimes()

    def start(self, root: str | Path, step: int, chunks, optimizer, common: dict[str, Any],
              per_rank: dict[str, Any] | None = None, keep_last: int | None = None) -> Path:
        """Begin saving ``step``; returns the folder it will have once published."""
        from megatron.core import dist_checkpointing

        begin = time.perf_counter()
        self.wait()
        times = SaveTimes(waited=time.perf_counter() - begin)
        tmp = checkpoint.begin_save(root, step)
        t = time.perf_counter()
        with deferred_gather(optimizer, self.snapshot_buffers) as deferred:
            state = checkpoint.sharded_state(chunks, optimizer, loading=False)
        deferred.own_storage(state)
        times.state_dict = time.perf_counter() - t
        t = time.perf_counter()
        copy_host_tensors(state, skip=deferred.holds)
        times.snapshot = time.perf_counter() - t
        t = time.perf_counter()
        request = dist_checkpointing.save(state, str(tmp), sharded_strategy=self._strategy(),
                                          async_sharded_save=True, validate_access_integrity=not self.validated)
        self.validated = True
        args = list(request.async_fn_args)
        if request.async_fn is not None:
            args[1] = to_host(args[1])
        times.plan = time.perf_counter() - t
        t = time.perf_counter()
        checkpoint.write_small_files(tmp, step, common, per_rank)
        times.small_files = time.perf_counter() - t
        pending = _Pending(tmp, keep_last, list(request.finalize_fns), None)
        if request.async_fn is not None or deferred.fills:  # the gather is collective: every rank runs it
            pending.thread = threading.Thread(target=self._write,
                                              args=(pending, deferred, request.async_fn, args, times),
                                              name=f"ckpt-async-{step}", daemon=True)
            pending.thread.start()
        self.pending, self.times = pending, times
        return tmp.with_suffix("")

    def poll(self) -> Path | None:
        """Publish the pending save if every rank's writer is done (one all_reduce); the folder, or None."""
        if self.pending is None:
            return None
        running = self.pending.thread is not None and self.pending.thread.is_alive()
        flag = torch.tensor([int(running)], dtype=torch.int32, device=_comm_device())
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return None if flag.item() else self._finalize()

    def wait(self) -> Path | None:
        """Block until the pending save is written on every rank and published; the folder, or None."""
        if self.pending is None:
            return None
        if self.pending.thread is not None:
            self.pending.thread.join()
        return self._finalize()

    # --- internals ------------------------------------------------------------------------------
    def _strategy(self):
        if self.strategy is None:
            from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

            self.strategy = TorchDistSaveShardedStrategy("torch_dist", 1, cached_metadata=True)
        return self.strategy

    @staticmethod
    def _write(pending: _Pending, deferred: DeferredGather, write, args: list, times: SaveTimes) -> None:
        start = time.perf_counter()
        try:
            deferred.fill()  # the optimizer state gathered into the tensors the write reads
            times.gather = time.perf_counter() - start
            if write is not None:
                write(*args)
        except BaseException as err:  # megatron's finalize then finds no results and fails on every rank
            log.error("the checkpoint writer of %s failed: %r", pending.tmp, err)
        times.write = time.perf_counter() - start

    def _finalize(self) -> Path:
        pending, self.pending = self.pending, None
        for fn in pending.finalize_fns:  # collective; raises on every rank when any rank's writer failed
            fn()
        return checkpoint.publish(pending.tmp, pending.keep_last)


def _comm_device() -> torch.device:
    from ualm_nemo.distributed.parallel import comm_device

    return comm_device()
