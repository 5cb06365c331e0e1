"""Megatron dist checkpoints written and read one tensor at a time: converters hold a tensor, not the model.

The model is built without initialisation (``build_model(initialize=False)``): its big tensors are allocated
with ``torch.empty`` and never written, so they cost address space, not memory (the kernel commits a page only
when it is first touched). That model still describes the checkpoint completely: its ``sharded_state_dict``
names every key, shape and chunk exactly as training writes them (TE names, stacked layers, SwiGLU halves).

Writing (:func:`save_streamed`): megatron's own ``dist_checkpointing.save`` (preprocessing, ``common.pt``,
``metadata.json``) with a save strategy whose planner produces each chunk's bytes only when torch's DCP writer
reaches that chunk: ``resolve(key)`` makes the full tensor of one state-dict key, the chunk is cut from it by
the same view megatron cut from the (untouched) parameter, written, dropped. The last resolved tensor is kept
for the next chunk (a SwiGLU weight is written as two halves).

Reading (:class:`StreamedCheckpointReader`): ``get(key)`` loads one state-dict key's full tensor into fresh
memory through ``dist_checkpointing.load`` with only that key requested (any saved TP/PP layout: the loader
reads just the chunks it needs).

Both are collective: every rank runs the same calls in the same order (one process is the normal case).
Both use two internals of megatron-core 0.16.1's torch_dist strategy (its key grouping and its conversion to
torch ShardedTensors); tests/convert compares both directions with megatron's own save and load.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Mapping

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.strategies.torch import (MCoreSavePlanner, TorchDistSaveShardedStrategy,
                                                               _replace_state_dict_keys_with_sharded_keys,
                                                               mcore_to_pyt_state_dict)
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.planner import WriteItemType

Resolve = Callable[[str], torch.Tensor]


class _ViewIndex:
    """Finds which state-dict tensor a view belongs to (by storage), so the view can be redone on its real data."""

    def __init__(self, state: Mapping[str, torch.Tensor]) -> None:
        self._by_storage: dict[int, tuple[str, torch.Tensor]] = {}
        for key, tensor in state.items():
            if not isinstance(tensor, torch.Tensor) or tensor.numel() == 0:
                continue
            ptr = tensor.untyped_storage().data_ptr()
            if ptr in self._by_storage:
                raise ValueError(f"state-dict tensors {self._by_storage[ptr][0]!r} and {key!r} share storage")
            if not tensor.is_contiguous():
                raise ValueError(f"state-dict tensor {key!r} is not contiguous")
            self._by_storage[ptr] = (key, tensor)

    def owner(self, view: torch.Tensor) -> tuple[str, torch.Tensor, int]:
        """(state-dict key, that (placeholder) tensor, element offset of ``view`` inside it)."""
        found = self._by_storage.get(view.untyped_storage().data_ptr())
        if found is None:
            raise KeyError(f"a checkpoint chunk of shape {tuple(view.shape)} is no view of a state-dict tensor")
        key, base = found
        return key, base, view.storage_offset() - base.storage_offset()


class _ResolvingPlanner(MCoreSavePlanner):
    """Megatron's save planner, except that a tensor chunk's data is made when the writer asks for it."""

    def __init__(self, chunks: dict[tuple[str, tuple[int, ...]], ShardedTensor], views: _ViewIndex,
                 resolve: Resolve) -> None:
        super().__init__(dedup_replicated_tensors=False, flatten_state_dict=False)
        self._chunks, self._views, self._resolve = chunks, views, resolve
        self._cached: tuple[str, torch.Tensor] | None = None
        self.resolved = 0  # how many times ``resolve`` ran (tests: each key once when chunks come in order)

    def _full(self, key: str, like: torch.Tensor) -> torch.Tensor:
        if self._cached is None or self._cached[0] != key:
            self._cached = None  # drop the previous tensor before making the next
            tensor = self._resolve(key)
            if tensor.shape != like.shape or tensor.dtype != like.dtype:
                raise ValueError(f"{key!r}: made {tuple(tensor.shape)} {tensor.dtype}, the checkpoint holds "
                                 f"{tuple(like.shape)} {like.dtype}")
            self._cached = (key, tensor.contiguous())
            self.resolved += 1
        return self._cached[1]

    def resolve_data(self, write_item):
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        chunk = self._chunks[(write_item.index.fqn, tuple(write_item.index.offset))]
        key, placeholder, offset = self._views.owner(chunk.data)
        full = self._full(key, placeholder)  # the chunk is cut from it exactly as megatron cut it from the placeholder
        return full.as_strided(chunk.data.shape, chunk.data.stride(), full.storage_offset() + offset)

    def finish_writing(self) -> None:
        self._cached = None


class _StreamingSaveStrategy(TorchDistSaveShardedStrategy):
    """torch_dist v1 (what megatron's default writes), saved synchronously through the resolving planner."""

    def __init__(self, views: _ViewIndex, resolve: Resolve) -> None:
        super().__init__("torch_dist", 1, keep_only_main_replica=True, thread_count=1)
        self._views, self._resolve = views, resolve
        self.planner: _ResolvingPlanner | None = None

    def save(self, sharded_state_dict, checkpoint_dir) -> None:
        flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, keep_only_main_replica=True)
        pyt_state = mcore_to_pyt_state_dict(flat, is_loading=False)  # re-views each chunk's data (same storage)
        chunks = {(sh.key, tuple(sh.global_offset)): sh for shards in flat.values() for sh in shards
                  if isinstance(sh, ShardedTensor)}
        self.planner = _ResolvingPlanner(chunks, self._views, self._resolve)
        dcp_save(pyt_state, storage_writer=FileSystemWriter(str(checkpoint_dir), single_file_per_rank=True,
                                                            thread_count=1),
                 planner=self.planner)
        self.planner.finish_writing()


def save_streamed(model: torch.nn.Module, checkpoint_dir: str | Path, resolve: Resolve,
                  prefix: str = "model0") -> int:
    """Write ``model``'s dist checkpoint to ``checkpoint_dir`` with every tensor made by ``resolve(key)``.

    ``model``'s own memory is never read for tensors ``resolve`` makes (it may be untouched ``torch.empty``);
    ``resolve`` gets each state-dict key of ``model`` (local names, e.g. ``decoder.layers.0.mlp.linear_fc1.weight``)
    and returns that tensor whole, in the model's dtype and shape. Returns how many tensors were resolved.
    ``prefix``: the top-level key of the model in the saved state (ualm_nemo.distributed.checkpoint's layout).
    """
    views = _ViewIndex(model.state_dict())
    strategy = _StreamingSaveStrategy(views, resolve)
    dist_checkpointing.save({prefix: model.sharded_state_dict(prefix="")}, str(checkpoint_dir),
                            sharded_strategy=strategy)
    return strategy.planner.resolved if strategy.planner is not None else 0


class StreamedCheckpointReader:
    """One state-dict key at a time, loaded whole (TP1/PP1 shape) from a dist checkpoint saved at any layout.

    ``model``: a TP1/PP1 model of the checkpoint's config built without initialisation; its sharded state dict
    says what to read, its memory is never written (each key is loaded into a fresh tensor).
    """

    def __init__(self, model: torch.nn.Module, checkpoint_dir: str | Path) -> None:
        self.path = str(checkpoint_dir)
        self._sharded = {k: v for k, v in model.sharded_state_dict(prefix="").items()
                         if isinstance(v, (ShardedTensor, ShardedTensorFactory))}

    def keys(self) -> list[str]:
        return list(self._sharded)

    def __contains__(self, key: object) -> bool:
        return key in self._sharded

    def get(self, key: str) -> torch.Tensor:
        entry = self._sharded.get(key)
        if entry is None:
            raise KeyError(f"the model has no checkpoint tensor {key!r}")
        fresh = torch.empty_like(entry.data)
        if isinstance(entry, ShardedTensorFactory):  # e.g. SwiGLU fc1: saved as two halves, views of ``fresh``
            parts = dataclasses.replace(entry, data=fresh).build()
            request = {f"part{i}": _as_single_chunk(sh) for i, sh in enumerate(nested_values(parts))}
        else:
            request = {"tensor": _as_single_chunk(dataclasses.replace(entry, data=fresh))}
        dist_checkpointing.load(request, self.path, validate_access_integrity=False)
        return fresh  # every requested chunk is a view of it, loaded in place

    __getitem__ = get


def _as_single_chunk(sh: ShardedTensor) -> ShardedTensor:
    """The same chunk with megatron's prepended axes (the layer index) folded into its data and no sharding
    grid, so it loads alone: megatron's grid path expects every chunk of a key at world size 1."""
    if not isinstance(sh, ShardedTensor) or sh.flattened_range is not None:
        raise TypeError(f"cannot stream-load {type(sh).__name__} {getattr(sh, 'key', '')!r}")
    local = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
    return dataclasses.replace(sh, data=sh.data.view(local), local_shape=local, prepend_axis_num=0,
                               axis_fragmentations=None)
