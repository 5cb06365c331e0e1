"""Deterministic, resumable stream of global batches, sharded over data-parallel ranks.

Sample ``i`` of the run is ``dataset[perm_epoch[i % N]]`` with ``epoch = i // N`` and a permutation seeded by
(seed, epoch). Its position is a single integer, ``consumed_samples`` (as in Megatron-LM), saved in every
checkpoint: a resumed run starts at exactly the next sample, whatever the world size. Each DP rank takes its
contiguous slice of every global batch, so an epoch is seen once across ranks with no repeats.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import IterableDataset

from ualm_nemo.data.microbatch import MicroBatch


def own_generator(seed: int = 0) -> torch.Generator:
    """A generator for a DataLoader to draw its iterator seeds from, instead of the global RNG.

    Each new iterator (every start, every resume) takes one number from its generator; from the global RNG that
    draw would make a resumed run's random stream differ from an uninterrupted one's after the restore."""
    return torch.Generator().manual_seed(seed)


@dataclass
class DataPosition:
    """Shared, mutable position of the stream (updated as batches are taken, restored on resume)."""

    consumed_samples: int = 0


class GlobalBatchStream(IterableDataset):
    """Yields this DP rank's share of each global batch, collated, forever (``max_steps`` ends the run)."""

    def __init__(self, dataset: Sequence[Any], collate: Callable[[list[Any]], MicroBatch], global_batch_size: int,
                 dp_rank: int, dp_size: int, seed: int, position: DataPosition | None = None) -> None:
        if global_batch_size % dp_size:
            raise ValueError(f"train.global_batch_size={global_batch_size} is not divisible by the "
                             f"data-parallel size {dp_size}")
        if len(dataset) == 0:
            raise ValueError("the training dataset is empty")
        self.dataset, self.collate = dataset, collate
        self.global_batch_size, self.dp_rank, self.dp_size, self.seed = global_batch_size, dp_rank, dp_size, seed
        self.position = position or DataPosition()
        self._perm_cache: dict[int, torch.Tensor] = {}

    def _index(self, i: int) -> int:
        n = len(self.dataset)
        epoch, offset = divmod(i, n)
        if epoch not in self._perm_cache:
            self._perm_cache = {epoch: torch.randperm(n, generator=torch.Generator().manual_seed(
                self.seed * 100_003 + epoch))}
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)
        return int(self._perm_cache[epoch][offset])

    def __iter__(self) -> Iterator[MicroBatch]:
        per_rank = self.global_batch_size // self.dp_size
        while True:
            start = self.position.consumed_samples + self.dp_rank * per_rank
            samples = [self.dataset[self._index(i)] for i in range(start, start + per_rank)]
            self.position.consumed_samples += self.global_batch_size
            yield self.collate(samples)
