"""Start-up metadata cost of the Shar loader on one rank: per-shard meta files (before) vs one index per source.

  .venv/bin/python benchmarks/shard_startup.py                    # 3 sources x 15,000 shards under /tmp
  .venv/bin/python benchmarks/shard_startup.py --shards 2000 --sources 1 --out /lustre/me/bench

Writes metadata-only sources (empty cuts files and one meta file per shard, as the codec stage leaves them;
shard 0 holds one cut, for the task), then, for one rank, measures the files opened inside the sources and the
seconds until the loader has its counts and tasks: ``before`` the per-shard path the loader used (shard_counts +
source_task per source), ``after`` shard_index.source_indexes over indexes the tokenize stage wrote. Also the
one-time cost of building the indexes. Each figure is the best of --repeats (a warm page cache: a parallel file
system makes the per-shard path slower still, per open). At scale, ``before`` is paid by every rank; ``after``
by one rank, the others receive a broadcast.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import tempfile
import time
from pathlib import Path

from ualm_nemo.data.shar import meta_path, shard_counts, shards_dir, source_task
from ualm_nemo.data.shard_index import build_index, source_indexes
from ualm_nemo.testing.file_opens import FileOpens

CUT = {"id": "c0", "start": 0.0, "duration": 1.0, "channel": 0, "custom": {"task": "text"}, "type": "MonoCut"}


def write_source(folder: Path, shards: int, cuts_per_shard: int = 1000) -> None:
    """A metadata-only source: shards/cuts.*.jsonl.gz (empty but shard 0) and meta/*.json."""
    shards_dir(folder).mkdir(parents=True)
    (folder / "meta").mkdir()
    meta = json.dumps({"num_cuts": cuts_per_shard, "num_rejects": 0, "fields": [], "audio_seconds": 0.0}) + "\n"
    for shard in range(shards):
        cuts = shards_dir(folder) / f"cuts.{shard:06d}.jsonl.gz"
        if shard == 0:
            with gzip.open(cuts, "wt") as f:
                f.write(json.dumps(CUT) + "\n")
        else:
            cuts.touch()
        meta_path(folder, shard).write_text(meta)


def measure(fn, folders: list[Path], repeats: int) -> tuple[int, float]:
    """(files opened inside ``folders`` by one call, best seconds over ``repeats`` calls)."""
    best, opened = float("inf"), 0
    for _ in range(repeats):
        with FileOpens(under=folders) as opens:
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        opened = opens.count
    return opened, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=15000, help="shards per source")
    parser.add_argument("--sources", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="folder for the sources (default: a temporary one, removed)")
    args = parser.parse_args()

    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="shard_startup_"))
    folders = [root / f"source{i}" for i in range(args.sources)]
    try:
        t0 = time.perf_counter()
        for folder in folders:
            if not folder.exists():
                write_source(folder, args.shards)
        print(f"{args.sources} source(s) x {args.shards} shards (metadata only) under {root}: "
              f"{time.perf_counter() - t0:.1f} s to write")

        def before():
            return [(shard_counts(f), source_task(f)) for f in folders]

        def after():
            return [(i.counts, i.task) for i in source_indexes(folders)]

        build_opens, build_s = measure(lambda: [build_index(f) for f in folders], folders, 1)
        old_opens, old_s = measure(before, folders, args.repeats)
        new_opens, new_s = measure(after, folders, args.repeats)
        assert before() == after(), "the index gives other counts than the per-shard meta files"
        print(f"before (per-shard meta files, every rank): {old_opens:,} files opened, {old_s:.2f} s to the counts")
        print(f"after  (one index per source, rank 0):      {new_opens:,} files opened, {new_s:.3f} s to the counts")
        print(f"index build, once (tokenize stage or first use): {build_opens:,} files opened, {build_s:.2f} s")
        print(f"ratio: {old_opens / max(new_opens, 1):,.0f}x fewer opens, {old_s / new_s:.0f}x faster")
    finally:
        if not args.out:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
