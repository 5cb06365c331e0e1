"""What a checkpoint save costs the training step: synchronous save time vs asynchronous stall, in one run.

  .venv/bin/python benchmarks/checkpoint_save.py                       # hidden 768, 6 layers: ~0.1 B parameters
  .venv/bin/python benchmarks/checkpoint_save.py --hidden 2048 --layers 8 --ffn 5632 --out /fast/disk/ckpt

One process (world 1: gloo on a CPU, NCCL on a GPU), the engine of training (Megatron DDP + distributed optimizer,
fp32), one training step first so the optimizer has its state. Then, alternating ``--repeats`` times:

* sync: ``engine.save`` (megatron-core's synchronous ``dist_checkpointing.save``), the whole call timed;
* async: ``engine.save(async_save=True)``, timed until it returns (the stall the step pays), followed by training
  steps until the background write is done, then ``finish_save`` (publish; not counted: at the next step it is
  one all_reduce). Its parts: the sharded state dict, megatron's plan (+ checks, common.pt), the snapshot copy,
  the small files. The steps during the write are timed against steps without one (contention for CPU cores
  and memory bandwidth: a cost the stall does not show).

The first save of each kind is a warm-up (the first async save also checks the sharding integrity and the 2nd
validates megatron's cached plan; from the 3rd on the plan is reused). Figures: median [min, max] of the timed
rounds; the ratio is async stall / sync save time (target <= 10 %).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from _timing import device_name, timed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--groups", type=int, default=4, help="KV heads (GQA)")
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--text-vocab", type=int, default=32768)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="checkpoint folder (default: a temporary one, removed after)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def build_engine(args: argparse.Namespace):
    from ualm_nemo.distributed.optim import OptimConfig
    from ualm_nemo.distributed.parallel import init_distributed, init_model_parallel
    from ualm_nemo.model.config import BACKBONES, AudioInputConfig, ParallelConfig, UALMConfig
    from ualm_nemo.training.engine import MegatronEngine

    backbone = dataclasses.replace(BACKBONES["tiny"], num_layers=args.layers, hidden_size=args.hidden,
                                   ffn_hidden_size=args.ffn, num_attention_heads=args.heads,
                                   num_query_groups=args.groups, text_vocab_size=args.text_vocab)
    cfg = UALMConfig(backbone=backbone, audio_in=AudioInputConfig(enabled=False),
                     parallel=ParallelConfig(transformer_impl="local", use_distributed_optimizer=True)).validate(1)
    init_distributed()
    init_model_parallel(cfg.parallel, seed=0)
    return MegatronEngine(cfg, OptimConfig(lr=1e-4, min_lr=1e-5, weight_decay=0.1), max_steps=10**6)


def summary(seconds: list[float]) -> str:
    return f"{statistics.median(seconds):7.3f} s [{min(seconds):.3f}, {max(seconds):.3f}]"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ualm_nemo.testing.batches import random_batch

    engine = build_engine(args)
    batch = [random_batch(engine.cfg.vocab, args.seq, 0)]
    step = lambda: engine.train_step(batch)  # noqa: E731
    step()
    params = sum(p.numel() for chunk in engine.chunks for p in chunk.parameters())
    root = Path(args.out or tempfile.mkdtemp(prefix="ualm_ckpt_bench_"))
    plain = [timed(step, args.device) for _ in range(3)]
    sync, stall, parts, busy_steps = [], [], [], []
    try:
        for i in range(args.repeats + 2):  # 2 warm-up rounds: the async plan is cached from the 3rd save on
            seconds = timed(lambda: engine.save(str(root), keep_last=2), args.device)
            step()
            start = time.perf_counter()
            engine.save(str(root), keep_last=2, async_save=True)
            seconds_async = time.perf_counter() - start
            steps_during = []
            while engine.saver.pending.thread is not None and engine.saver.pending.thread.is_alive():
                steps_during.append(timed(step, args.device))
            engine.finish_save()
            if i >= 2:
                sync.append(seconds)
                stall.append(seconds_async)
                parts.append(engine.saver.times)
                busy_steps += steps_during
            step()
        size = sum(f.stat().st_size for f in (root / (root / "latest").read_text().strip()).iterdir()) / 2**30
    finally:
        if args.out is None:
            shutil.rmtree(root, ignore_errors=True)
    print(f"device: {device_name(args.device)}; torch {torch.__version__}; fp32, distributed optimizer "
          "(fully_reshardable)")
    print(f"shape: hidden {args.hidden}, {args.layers} layers, ffn {args.ffn}, text vocab {args.text_vocab}: "
          f"{params / 1e6:.0f} M parameters, checkpoint {size:.2f} GiB; {args.repeats} timed rounds after 2 warm-up")
    print(f"  sync save            {summary(sync)}")
    print(f"  async stall          {summary(stall)}")
    for name in ("state_dict", "plan", "snapshot", "small_files"):
        print(f"    {name:<18} {summary([getattr(p, name) for p in parts])}")
    print(f"  async write (thread) {summary([p.write for p in parts])}")
    if busy_steps:
        print(f"  train step           {summary(plain)} alone, {summary(busy_steps)} during a write "
              f"({len(busy_steps)} steps)")
    ratios = [a / s for a, s in zip(stall, sync)]
    print(f"  ratio async stall / sync save: {statistics.median(ratios):.1%} "
          f"[{min(ratios):.1%}, {max(ratios):.1%}] (target <= 10 %)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
