"""Loader and codec-stage throughput on this machine, against what one H100 consumes in a 7B run.

  .venv/bin/python benchmarks/data_loader.py                      # synthetic data, tiny codec, 1-4 workers
  .venv/bin/python benchmarks/data_loader.py --workers 2 --pack --codec /models/xcodec

Builds (once, under --out) the synthetic demo data set with --per-task samples per task, prepares it, writes Shar
shards through the codec stage (reporting seconds of audio encoded per second), then iterates the training
loader with the paper's blend (understanding 37.8 / generation 37.3 / text 24.9 % of samples) and reports, per
worker count: micro-batches/s, samples/s and tokens/s (non-pad sequence positions) for one process, and the
ratio of tokens/s to --gpu-tokens-per-s (a 7B model on one H100 trains ~14k tokens/s): the goal is >= 3x.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path

import torch

from ualm_nemo.data.tokenize_stage import pick_device, tokenize_source
from ualm_nemo.codec.xcodec import CodecTokenizer, build_tiny_xcodec
from ualm_nemo.data.cuts import prepare_source
from ualm_nemo.data.formatting import SampleFormatter
from ualm_nemo.data.shar_dataset import SharBatchLoader, SharLoaderConfig
from ualm_nemo.data.synthetic import synthesize_demo_data
from ualm_nemo.data.tokenizer import build_tokenizer
from ualm_nemo.model.vocab import UnifiedVocab

PAPER_SHARES = {"understanding": 37.8, "tta": 37.3, "text": 24.9}


def build_data(out: Path, per_task: int, codec: CodecTokenizer, shard_size: int) -> dict:
    stats = {}
    if not (out / "shar" / "text" / "meta").is_dir():
        manifests = synthesize_demo_data(out / "raw", num_tta=per_task, num_understanding=per_task,
                                         num_text=per_task, seed=0)
        for task, path in manifests.items():
            prepare_source(task, path, out / "prepared" / task)
    for task in PAPER_SHARES:
        report = tokenize_source(out / "prepared" / task / "cuts.jsonl.gz", out / "shar" / task,
                                 codec if task == "tta" else None, shard_size=shard_size, progress=False)
        if task == "tta" and report.shards_written:
            stats = {"codec_audio_seconds": round(report.audio_seconds, 1),
                     "codec_stage_audio_s_per_s": round(report.realtime_factor, 1),
                     "codec_encode_only_audio_s_per_s": round(report.audio_seconds / report.encode_seconds, 1)}
    return stats


def bench_loader(out: Path, formatter: SampleFormatter, workers: int, batches: int, args) -> dict:
    cfg = SharLoaderConfig(sources=[{"name": t, "shar_dir": str(out / "shar" / t), "weight": w}
                                    for t, w in PAPER_SHARES.items()], weighting="fixed", seed=0,
                           window_size=args.window, max_tokens=args.max_tokens, seq_len=args.seq_len,
                           pack=args.pack, num_workers=workers)
    loader = SharBatchLoader(cfg, formatter)
    it = iter(loader)
    for _ in range(args.warmup):  # worker start-up and first windows
        next(it)
    samples = tokens = 0
    t0 = time.perf_counter()
    for batch in itertools.islice(it, batches):
        samples += len(batch.ids)
        tokens += int(batch.lengths.sum())
    dt = time.perf_counter() - t0
    return {"workers": workers, "batches_per_s": round(batches / dt, 2), "samples_per_s": round(samples / dt, 1),
            "tokens_per_s": round(tokens / dt), "mean_sample_len": round(tokens / samples, 1),
            "x_h100_7b": round(tokens / dt / args.gpu_tokens_per_s, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/ualm_loader_bench")
    parser.add_argument("--per-task", type=int, default=300)
    parser.add_argument("--shard-size", type=int, default=100)
    parser.add_argument("--codec", default="tiny", help="'tiny' or a local X-Codec folder")
    parser.add_argument("--tokenizer", default="byte")
    parser.add_argument("--text-vocab-size", type=int, default=384, help="151936 for a Qwen2.5 tokenizer")
    parser.add_argument("--workers", default="1,2,3,4")
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--pack", action="store_true")
    parser.add_argument("--gpu-tokens-per-s", type=float, default=14000.0)
    args = parser.parse_args()

    out = Path(args.out)
    model = build_tiny_xcodec(0) if args.codec == "tiny" else None
    codec = CodecTokenizer(model) if model is not None else CodecTokenizer.from_pretrained(args.codec)
    codec.model.to(pick_device())
    data_stats = build_data(out, args.per_task, codec, args.shard_size)
    formatter = SampleFormatter(build_tokenizer(args.tokenizer), UnifiedVocab(args.text_vocab_size))
    print(json.dumps({"machine": f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}",
                      "codec": args.codec, "pack": args.pack, **data_stats}))
    for w in (int(x) for x in args.workers.split(",")):
        print(json.dumps(bench_loader(out, formatter, w, args.batches, args)))


if __name__ == "__main__":
    main()
