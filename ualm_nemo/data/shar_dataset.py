"""The training loader over Shar sources: blended, bucketed or packed micro-batches, DP-sharded, exactly resumable.

Order (all pure functions of the config, the seed and the DP rank; nothing depends on worker count or timing):

1. Per source and DP rank, an infinite stream of sample references ``(shard, offset)`` (``SourceView``; shard
   counts and task from the source's index, read by one rank and broadcast: shard_index.py). Epoch e
   permutes the shards (seed, source, e); with at least as many shards as ranks, rank r takes every W-th
   shard of that permutation, else it takes every W-th item of the whole epoch. Items inside a shard are
   permuted too. Either way the ranks' epochs are disjoint and together cover the source exactly once.
2. The stream is cut into windows of ``window_size`` samples. Window w's blend choices come from
   (seed, rank, w) (blend.py); source s's k-th pick in the window is its sample ``cursor_s + k``.
3. A window's samples are read (shar.ShardReader), formatted (formatting.py: chat layout, CFG dropout drawn from
   (seed, source, epoch, cut id), log-mel for understanding), then batched by token budget (bucketing) or packed
   into rows (batching.py); the window's batches are yielded in a seeded shuffled order.

Position = ``{"window", "batch_in_window", "cursors"}`` (cursors at the window's start): ``state_dict()`` /
``load_state_dict()`` restore it, and every batch carries the position *after* it in ``batch.loader_state``
(a training loop that prefetches saves the state of the last batch it trained on). A resumed loader re-reads
its window and skips the batches already consumed, so it yields exactly the next batch.

DataLoader workers each build whole windows (worker k of K: windows start + k, start + k + K, ...) and the
DataLoader returns them in window order, so the batches are the same for any ``num_workers``.

Post-training cuts (cuts.py: one cut per SFT conversation or DPO pair) are formatted by the functions the
in-memory datasets use (posttrain_dataset.format_conversation_record / format_preference_record, their clips
served from the cut by ``cuts.CutClips``), so a record gives the same sample on both paths. Their length is
computed from the cut's spans first (``conversation_length``): an over-long one is skipped before any audio
is loaded. Conversation samples blend, bucket and pack like the other tasks. Preference sources are DPO: they
must be the loader's only sources (a mix with other tasks is refused) and are never packed (``pack: true`` is
refused); a window's pairs are bucketed by their longer side, two rows each (``max_tokens // 2`` per pair row
budget, ``max_rows // 2`` pairs), and collated by ``posttrain_dataset.collate_pairs``: rows chosen, rejected,
chosen, ... (pair k at rows 2k, 2k + 1), ``pair_ids`` the records' ids (what DPO reference log-probs are
keyed by), ``ids`` one source/cut id per pair; a side longer than ``min(seq_len, max_tokens // 2)`` skips the
pair.

Each yielded micro-batch is a ``microbatch.MicroBatch`` from ``dataset.collate`` (or ``batching.collate_packed``
when packing, or ``collate_pairs`` for DPO) with ``ids`` (source/cut id per sample, row-major) and
``loader_state`` set. Batch sizes vary (token budget); a training step takes ``num_microbatches`` consecutive
micro-batches on every rank.
"""

from __future__ import annotations

import logging
import random
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ualm_nemo.data.batching import bucket_batches, collate_packed, pack_rows
from ualm_nemo.data.blend import blend_probabilities, window_choices, window_counts
from ualm_nemo.data.cuts import (POSTTRAIN_TASKS, CutClips, cut_caption, cut_record, cut_task, cut_turns,
                                 cut_waveform)
from ualm_nemo.data.dataset import collate
from ualm_nemo.data.formatting import Sample, SampleFormatter
from ualm_nemo.data.microbatch import MicroBatch
from ualm_nemo.data.posttrain_dataset import (collate_pairs, format_conversation_record, format_preference_record,
                                              pair_formatter, record_length)
from ualm_nemo.data.shar import CODEC_FIELD, ShardReader
from ualm_nemo.data.shard_index import source_indexes
from ualm_nemo.data.shar_config import SharLoaderConfig
from ualm_nemo.data.stream import own_generator

log = logging.getLogger(__name__)


def _key(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))


class SourceView:
    """One DP rank's infinite stream of (shard, offset) references into one source."""

    def __init__(self, name: str, counts: dict[int, int], seed: int, rank: int, world: int):
        if not counts or sum(counts.values()) == 0:
            raise ValueError(f"source {name!r} has no finished shards with samples")
        self.name, self.seed, self.rank, self.world = name, seed, rank, world
        self.shards = np.array(sorted(counts), dtype=np.int64)
        self.sizes = np.array([counts[s] for s in self.shards], dtype=np.int64)
        self.by_shard = len(self.shards) >= world
        if not self.by_shard and int(self.sizes.sum()) < world:
            raise ValueError(f"source {name!r} has {int(self.sizes.sum())} samples for {world} data-parallel ranks")
        self._starts = [0]  # stream index of each epoch's first sample (grown on demand)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def epoch_refs(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard ids, offsets) of this rank's samples in epoch ``epoch``, in stream order."""
        if epoch in self._cache:
            return self._cache[epoch]
        base = [self.seed, _key(self.name), epoch]
        order = np.random.default_rng(base).permutation(len(self.shards))
        if self.by_shard:
            order = order[self.rank::self.world]
        shard_ids = np.repeat(self.shards[order], self.sizes[order])
        offsets = np.concatenate([np.random.default_rng([*base, int(self.shards[i])]).permutation(int(self.sizes[i]))
                                  for i in order]) if len(order) else np.zeros(0, np.int64)
        if not self.by_shard:
            shard_ids, offsets = shard_ids[self.rank::self.world], offsets[self.rank::self.world]
        if len(self._cache) >= 2:
            self._cache.pop(min(self._cache))
        self._cache[epoch] = (shard_ids, offsets)
        return shard_ids, offsets

    def epoch_length(self, epoch: int) -> int:
        if not self.by_shard:
            return (int(self.sizes.sum()) - self.rank + self.world - 1) // self.world
        order = np.random.default_rng([self.seed, _key(self.name), epoch]).permutation(len(self.shards))
        return int(self.sizes[order[self.rank::self.world]].sum())

    def locate(self, j: int) -> tuple[int, int, int]:
        """(epoch, shard, offset) of this rank's j-th sample of the source."""
        while self._starts[-1] <= j:
            n = self.epoch_length(len(self._starts) - 1)
            if n == 0:  # this rank got no shard this epoch (uneven shard counts): an empty epoch
                self._starts.append(self._starts[-1])
                if len(self._starts) > 1000:
                    raise ValueError(f"source {self.name!r}: rank {self.rank} draws no shard; use smaller shards")
                continue
            self._starts.append(self._starts[-1] + n)
        epoch = int(np.searchsorted(self._starts, j, side="right")) - 1
        shard_ids, offsets = self.epoch_refs(epoch)
        k = j - self._starts[epoch]
        return epoch, int(shard_ids[k]), int(offsets[k])


@dataclass
class _Plan:
    """Everything a worker needs to build any window (picklable)."""

    cfg: SharLoaderConfig
    formatter: SampleFormatter
    probs: np.ndarray
    sizes: list[dict[int, int]]
    rank: int
    world: int
    pairs: bool = False  # DPO: every source holds preference cuts; batches of pairs, never packed
    views: list[SourceView] = field(default_factory=list)
    readers: list[ShardReader] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.views = [SourceView(s.name, c, self.cfg.seed, self.rank, self.world)
                      for s, c in zip(self.cfg.sources, self.sizes)]
        self.readers = [ShardReader(s.shar_dir) for s in self.cfg.sources]
        self.pair_fmt = pair_formatter(self.formatter) if self.pairs else None

    @property
    def limit(self) -> int:
        """Longest sample (a pair: its longer side) a micro-batch takes; longer ones are skipped."""
        cfg = self.cfg
        if self.pairs:  # two rows, chosen and rejected
            return min(cfg.seq_len, cfg.max_tokens // 2)
        return cfg.seq_len if cfg.pack else min(cfg.seq_len, cfg.max_tokens)

    def counts(self, window: int) -> np.ndarray:
        return window_counts(self.probs, self.cfg.seed, self.rank, window, self.cfg.window_size)

    def sample(self, source: int, j: int) -> Sample:
        epoch, shard, offset = self.views[source].locate(j)
        cut = self.readers[source].get(shard, offset)
        name = self.cfg.sources[source].name
        rng = random.Random(f"{self.cfg.seed}:{name}:{epoch}:{cut.id}")
        task = cut_task(cut)
        fmt = self.formatter
        if task in POSTTRAIN_TASKS:
            return self._posttrain(cut, f"{name}/{cut.id}", rng)
        if task == "tta":
            codes = torch.from_numpy(cut.load_custom(CODEC_FIELD).astype(np.int64))  # [T, 8]
            sample = fmt.format_tta(cut_caption(cut), codes, rng)
        elif task == "understanding":
            sample = fmt.format_understanding(cut_turns(cut), cut_waveform(cut))
        else:
            sample = fmt.format_text(cut_turns(cut))
        sample["id"] = f"{name}/{cut.id}"
        return sample

    def _posttrain(self, cut: Any, sample_id: str, rng: random.Random) -> dict[str, Any]:
        """A conversation sample, or a pair {"id": record id, "chosen", "rejected"}, through the functions the
        in-memory datasets use (posttrain_dataset.py); its length is computed from the cut's spans first, and a
        sample longer than ``limit`` comes back as ``{"id", "length"}`` without any audio loaded."""
        record = cut_record(cut)
        length = record_length(record, self.formatter, CutClips(cut, lengths_only=True))
        if length > self.limit:
            return {"id": sample_id, "length": length}
        if cut_task(cut) == "conversation":
            sample = format_conversation_record(self.formatter, record, CutClips(cut), rng)
            sample["id"] = sample_id
            return sample
        if self.pair_fmt is None:
            raise ValueError(f"{sample_id} is a preference pair in a loader of other tasks (DPO sources are loaded "
                             "alone)")
        item = format_preference_record(self.pair_fmt, record, CutClips(cut), rng)
        item["sample_id"] = sample_id
        return item

    @staticmethod
    def _length(x: dict[str, Any]) -> int:
        if "chosen" in x:
            return max(x["chosen"]["tokens"].shape[0], x["rejected"]["tokens"].shape[0])
        return x["tokens"].shape[0] if "tokens" in x else x["length"]

    def window(self, w: int, cursors: Sequence[int]) -> dict[str, Any]:
        """Window w's batches, given the source cursors at its start."""
        cfg, fmt = self.cfg, self.formatter
        next_j = list(cursors)
        samples = []
        for s in window_choices(self.probs, cfg.seed, self.rank, w, cfg.window_size):
            samples.append(self.sample(int(s), next_j[s]))
            next_j[s] += 1
        limit = self.limit
        kept = [x for x in samples if self._length(x) <= limit]
        if len(kept) < len(samples):
            log.warning("window %d: skipped %d samples longer than %d positions (data.seq_len): %s", w,
                        len(samples) - len(kept), limit,
                        ", ".join(f"{x.get('sample_id', x['id'])} ({self._length(x)})" for x in samples
                                  if self._length(x) > limit))
        lengths = [self._length(x) for x in kept]
        if self.pairs:  # rows chosen, rejected, chosen, ... (collate_pairs): a pair is two rows of its longer side
            groups = bucket_batches(lengths, cfg.max_tokens // 2, cfg.max_rows // 2 if cfg.max_rows else None,
                                    cfg.pad_to_multiple)
            batches = [collate_pairs([kept[i] for i in g], fmt.vocab, cfg.pad_to_multiple) for g in groups]
            ids = [[kept[i]["sample_id"] for i in g] for g in groups]
        elif cfg.pack:
            rows = pack_rows(lengths, cfg.seq_len)
            per_batch = max(1, min(cfg.max_tokens // cfg.seq_len, cfg.max_rows or 1 << 30))
            groups = [rows[k:k + per_batch] for k in range(0, len(rows), per_batch)]
            batches = [collate_packed([[kept[i] for i in row] for row in g], fmt.vocab, cfg.seq_len)
                       for g in groups]
            ids = [[kept[i]["id"] for row in g for i in row] for g in groups]
        else:
            groups = bucket_batches(lengths, cfg.max_tokens, cfg.max_rows, cfg.pad_to_multiple)
            batches = [collate([kept[i] for i in g], fmt.vocab, cfg.pad_to_multiple)
                       for g in groups]
            ids = [[kept[i]["id"] for i in g] for g in groups]
        order = np.random.default_rng([cfg.seed, self.rank, w, 0x5EED]).permutation(len(batches))
        for b, batch_ids in zip(batches, ids):
            b.ids = batch_ids
        return {"window": w, "batches": [batches[k] for k in order], "next_cursors": next_j,
                "skipped": len(samples) - len(kept)}


class _WindowStream(IterableDataset):
    """Windows from ``start`` on; with DataLoader workers, worker k builds windows start + k, start + k + K, ..."""

    def __init__(self, plan: _Plan, start: int, cursors: Sequence[int]):
        self.plan, self.start, self.cursors = plan, start, list(cursors)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        cursors = np.array(self.cursors, dtype=np.int64)
        w = self.start
        while True:
            if (w - self.start) % workers == worker:
                yield self.plan.window(w, cursors.tolist())
            cursors += self.plan.counts(w)
            w += 1


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # one process per core: intra-op threads would only contend


def check_pair_sources(cfg: SharLoaderConfig, tasks: dict[str, str | None]) -> bool:
    """True when the sources are DPO pairs (all of them); refuses a mix with other tasks, and packing."""
    dpo = sorted(name for name, task in tasks.items() if task == "preference")
    if not dpo:
        return False
    others = sorted(f"{name} ({task})" for name, task in tasks.items() if task != "preference")
    if others:
        raise ValueError(f"data.shar.sources mixes DPO preference sources ({', '.join(dpo)}) with other tasks "
                         f"({', '.join(others)}): a DPO run loads preference sources alone")
    if cfg.pack:
        raise ValueError(f"data.shar.pack: true with preference sources ({', '.join(dpo)}): DPO batches are pairs "
                         "(chosen, rejected rows), never packed; set data.shar.pack: false")
    if cfg.max_rows is not None and cfg.max_rows < 2:
        raise ValueError(f"data.shar.max_rows={cfg.max_rows}: a DPO micro-batch needs at least 2 rows (one pair)")
    if cfg.max_tokens // 2 < 1:
        raise ValueError(f"data.shar.max_tokens={cfg.max_tokens} cannot hold a pair")
    return True


class SharBatchLoader:
    """Iterable of micro-batches for one DP rank (see the module docstring); ``state_dict`` for checkpoints."""

    def __init__(self, cfg: SharLoaderConfig, formatter: SampleFormatter, dp_rank: int = 0, dp_size: int = 1,
                 group: Any = None):
        """``group``: the process group whose first rank reads the sources' indexes for all (shard_index.py);
        default the world when torch.distributed is initialised; every rank of it builds its loader."""
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} outside dp_size={dp_size}")
        indexes = source_indexes([s.shar_dir for s in cfg.sources], group)
        sizes = [index.counts for index in indexes]
        totals = [sum(c.values()) for c in sizes]
        probs = blend_probabilities([s.weight for s in cfg.sources], totals, cfg.weighting)
        self.cfg, self.dp_rank, self.dp_size = cfg, dp_rank, dp_size
        self.source_sizes = dict(zip([s.name for s in cfg.sources], totals))
        self.probabilities = dict(zip([s.name for s in cfg.sources], probs.tolist()))
        self.source_tasks = {s.name: index.task for s, index in zip(cfg.sources, indexes)}
        self.pairs = check_pair_sources(cfg, self.source_tasks)
        self._plan = _Plan(cfg, formatter, probs, sizes, dp_rank, dp_size, self.pairs)
        self._state = {"window": 0, "batch_in_window": 0, "cursors": [0] * len(cfg.sources)}
        if dp_rank == 0:
            log.info("Shar blend of %d source(s) (weighting=%s, pack=%s): %s", len(cfg.sources), cfg.weighting,
                     cfg.pack, "; ".join(f"{n} [{self.source_tasks[n]}] {self.source_sizes[n]} samples p={p:.3f}"
                                         for n, p in self.probabilities.items()))

    def _fingerprint(self) -> dict[str, Any]:
        c = asdict(self.cfg)
        c.pop("num_workers")
        c["sources"] = [[s["name"], s["weight"]] for s in c["sources"]]  # a moved folder keeps the stream
        # lists, not tuples: the state travels through pickles, JSON and DataLoader conversions unchanged
        return {**c, "sizes": self.source_sizes, "dp_rank": self.dp_rank, "dp_size": self.dp_size}

    def state_dict(self) -> dict[str, Any]:
        """Position after the last batch yielded (what a resumed loader continues from)."""
        return {**{k: (list(v) if isinstance(v, list) else v) for k, v in self._state.items()},
                "fingerprint": self._fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved, now = state.get("fingerprint", {}), self._fingerprint()
        diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if diff:
            raise ValueError(f"loader state was saved with different data settings ({', '.join(diff)}): "
                             f"saved {[saved.get(k) for k in diff]}, now {[now.get(k) for k in diff]}; "
                             "an exact resume needs the same data.* keys, sources and DP layout")
        self._state = {"window": int(state["window"]), "batch_in_window": int(state["batch_in_window"]),
                       "cursors": [int(c) for c in state["cursors"]]}

    def _windows(self, start: int, cursors: list[int]) -> Iterator[dict[str, Any]]:
        stream = _WindowStream(self._plan, start, cursors)
        if self.cfg.num_workers == 0:
            return iter(stream)
        return iter(DataLoader(stream, batch_size=None, num_workers=self.cfg.num_workers,
                               worker_init_fn=_worker_init, prefetch_factor=2, generator=own_generator()))

    def __iter__(self) -> Iterator[MicroBatch]:
        start = dict(self._state)
        skip = start["batch_in_window"]
        cursors = list(start["cursors"])
        unbatched = 0  # samples drawn since the last batch: past a whole epoch of every source, none ever fits
        for win in self._windows(start["window"], cursors):
            w, batches = win["window"], win["batches"]
            unbatched = 0 if batches else unbatched + self.cfg.window_size
            if unbatched > sum(self.source_sizes.values()):
                raise ValueError(f"no batch in {unbatched} samples drawn from data.shar (more than all its sources "
                                 f"hold, {sum(self.source_sizes.values())}): every sample is longer than "
                                 f"{self._plan.limit} positions (data.seq_len / max_tokens; see the skipped ids "
                                 "logged above)")
            for k in range(skip, len(batches)):
                last = k + 1 == len(batches)
                self._state = ({"window": w + 1, "batch_in_window": 0, "cursors": list(win["next_cursors"])}
                               if last else {"window": w, "batch_in_window": k + 1, "cursors": cursors})
                batch = batches[k]
                batch.loader_state = self.state_dict()
                yield batch
            if not batches or skip >= len(batches):
                self._state = {"window": w + 1, "batch_in_window": 0, "cursors": list(win["next_cursors"])}
            skip = 0
            cursors = list(win["next_cursors"])
