"""The distributed optimizer's fully reshardable state, snapshotted at the step and gathered later by the writer.

Megatron builds the ``fully_reshardable`` optimizer state of a save at the step: per buffer bucket it copies this
rank's shard of every main param and Adam moment into a contiguous tensor, all-gathers those over the data-parallel
group, concatenates them and copies the result into whole-buffer ("world") tensors, which the model-space state
dict then slices and reshapes. That is four copies of the whole optimizer state plus a collective, and it was 90 %
of an asynchronous save's stall (benchmarks/checkpoint_save.py).

``deferred_gather`` keeps only the first copy at the step (the unavoidable snapshot: the next step updates the live
state in place) and hands megatron empty world tensors to build the state dict on; ``fill`` (run by the writer
thread before it writes) gathers the snapshots into them. Megatron's own ``sharded_param_state_fully_reshardable``
still builds the state dict, so the files are those of a synchronous save (tested tensor for tensor).

The writer thread's gather runs while the main thread trains: it uses the optimizer's own gloo data-parallel
group, which megatron uses only for checkpoints (never in a training step), so the two threads never issue
collectives on one group. Without that group (or with precision-aware or FSDP optimizers, whose state megatron
reads differently) ``deferred_gather`` changes nothing and the gather stays at the step.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable, Iterator
from unittest import mock

import torch
import torch.distributed as dist

_KEYS = ("param", "exp_avg", "exp_avg_sq")


@dataclass
class DeferredGather:
    """The empty world tensors handed to megatron, the state dict's own tensors made from them, and how to fill
    both."""

    fills: list[Callable[[], None]] = field(default_factory=list)
    storages: set[int] = field(default_factory=set)  # of the world tensors, then of the state dict's tensors
    copies: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (world view, own tensor)

    def holds(self, tensor: torch.Tensor) -> bool:
        return tensor.untyped_storage().data_ptr() in self.storages

    def own_storage(self, state: dict) -> None:
        """Give every state-dict tensor that views a world tensor a storage of its own: megatron's async save
        plan clones CPU views at once (``_clone_if_needed``), which would copy the world tensors unfilled."""
        from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
        from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

        apply_factories(state)  # a factory's tensors (e.g. the gated MLP's two halves) are views of its data too

        def own(value):
            if isinstance(value, ShardedTensor) and value.data is not None and self.holds(value.data):
                target = torch.empty(value.data.shape, dtype=value.data.dtype)
                self.copies.append((value.data, target))
                value.data = target
            return value

        dict_list_map_inplace(own, state)
        self.storages.update(target.untyped_storage().data_ptr() for _, target in self.copies)

    def fill(self) -> None:
        """The writer thread's part (collective over each data-parallel gloo group)."""
        for fill in self.fills:
            fill()
        for view, target in self.copies:
            target.copy_(view)
        self.fills.clear()
        self.copies.clear()


def distributed_optimizers(optimizer) -> list:
    """The megatron DistributedOptimizers inside ``optimizer`` (a ChainedOptimizer holds several)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return [opt for opt in inner if isinstance(opt, DistributedOptimizer)]


def _deferrable(opt) -> bool:
    return (getattr(opt, "data_parallel_group_gloo", None) is not None
            and not opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8
            and not opt.ddp_config.use_megatron_fsdp)


SnapshotBuffers = dict  # (optimizer id, buffer, bucket) -> this rank's shard copies, reused save after save


@contextlib.contextmanager
def deferred_gather(optimizer, buffers: SnapshotBuffers) -> Iterator[DeferredGather]:
    """While open, the optimizers' ``sharded_state_dict`` snapshot their local shards (into ``buffers``, kept by
    the caller: pages touched once, not at every save; the previous save must be written) and return unfilled
    world tensors; ``DeferredGather.fill`` gathers them (collective over each data-parallel gloo group)."""
    from megatron.core.optimizer import distrib_optimizer

    deferred = DeferredGather()
    patched = [opt for opt in distributed_optimizers(optimizer) if _deferrable(opt)]
    for opt in patched:
        opt.get_parameter_state_dp_zero = _snapshot_then_defer(opt, deferred, buffers)
    # megatron collects garbage after building the state (0.3 s of a step at 0.1 B parameters on a CPU): skipped
    # here, the synchronous save keeps it
    with mock.patch.object(distrib_optimizer, "gc", SimpleNamespace(collect=lambda: 0)):
        try:
            yield deferred
        finally:
            for opt in patched:
                del opt.get_parameter_state_dp_zero  # back to the class's method


def _snapshot_then_defer(opt, deferred: DeferredGather, buffers: SnapshotBuffers) -> Callable[..., dict]:
    def get_parameter_state_dp_zero(use_gloo_comm: bool = True, empty_data: bool = False,
                                    return_on_all_ranks: bool = False) -> dict:
        if empty_data:  # a load: megatron's own (it allocates, gathers nothing)
            return type(opt).get_parameter_state_dp_zero(opt, use_gloo_comm, empty_data, return_on_all_ranks)
        state: dict = {"buckets_coalesced": True}
        for gbuf_idx, range_maps in enumerate(opt.gbuf_ranges):
            assert len(range_maps) == 1, "megatron supports one dtype per buffer"
            (dtype, bucket_maps), = range_maps.items()
            world = {key: torch.empty(opt.buffers[gbuf_idx].numel_unpadded, dtype=torch.float32)
                     for key in _KEYS}
            deferred.storages.update(t.untyped_storage().data_ptr() for t in world.values())
            snapshots = [_local_shards(opt, gbuf_idx, bucket_idx, bucket_map, buffers)
                         for bucket_idx, bucket_map in enumerate(bucket_maps)]
            deferred.fills.append(_gather_into(opt, gbuf_idx, snapshots, world))
            state[gbuf_idx] = {dtype: {**world, "numel_unpadded": opt.buffers[gbuf_idx].numel_unpadded}}
        return state

    return get_parameter_state_dp_zero


def _local_shards(opt, gbuf_idx: int, bucket_idx: int, bucket_map: dict,
                  buffers: SnapshotBuffers) -> dict[str, torch.Tensor]:
    """This rank's contiguous shard of one bucket (main params, Adam moments): the copy made at the step."""
    numel = opt.buffers[gbuf_idx].buckets[bucket_idx].grad_data.numel() // opt.data_parallel_group_gloo.size()
    # zeros once: the padding between params is in no param's range (never written); kept equal to megatron's
    key = (id(opt), gbuf_idx, bucket_idx)
    if key not in buffers:
        pinned = torch.cuda.is_available()  # page-locked: the device-to-host copies at the step run at full speed
        buffers[key] = {name: torch.zeros(numel, dtype=torch.float32, pin_memory=pinned) for name in _KEYS}
    shards = buffers[key]
    for model_param, ranges in bucket_map["param_map"].items():
        tensors = opt._get_main_param_and_optimizer_states(model_param)
        local = ranges["gbuf_local"]
        for name, shard in shards.items():
            shard[local.start:local.end].copy_(tensors[name].detach())
    return shards


def _gather_into(opt, gbuf_idx: int, snapshots: list[dict], world: dict) -> Callable[[], None]:
    """The writer thread's part: every data-parallel rank's snapshot, concatenated into the world tensors."""
    group = opt.data_parallel_group_gloo
    buckets = opt.buffers[gbuf_idx].buckets

    def fill() -> None:
        offset = 0
        for bucket, shards in zip(buckets, snapshots):
            for key, shard in shards.items():
                if group.size() == 1:
                    whole = shard
                else:
                    parts = [torch.empty_like(shard) for _ in range(group.size())]
                    dist.all_gather(parts, shard, group=group)
                    whole = torch.cat(parts)
                world[key][offset:offset + bucket.numel_unpadded].copy_(whole[:bucket.numel_unpadded])
            offset += bucket.numel_unpadded
        for tensor in world.values():
            tensor[offset:].zero_()  # nothing is left there; megatron's world tensors start as zeros

    return fill
