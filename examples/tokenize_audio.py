"""Codec stage: prepared cuts -> Lhotse Shar shards with 16 kHz audio and X-Codec tokens (int16 [T, 8], 50 Hz).

  # one process, all shards (GPU when present)
  python examples/tokenize_audio.py --cuts /data/prepared/audiocaps/cuts.jsonl.gz --out /data/shar/audiocaps \
      --codec /models/xcodec-hubert-general
  # N processes or a Slurm array share the shards (each task picks every N-th shard)
  sbatch --array=0-15 --wrap "python examples/tokenize_audio.py --cuts ... --out ... --codec ..."
  # or an explicit range
  python examples/tokenize_audio.py ... --shards 0:40

Re-running skips finished shards (a killed run resumes). ``--codec tiny`` uses the tiny random codec (tests, demo).
"""

import argparse
import json
import logging
import os

from ualm_nemo.codec.tokenize_stage import count_cuts, num_shards, pick_device, select_shards, tokenize_source
from ualm_nemo.codec.xcodec import CodecTokenizer, build_tiny_xcodec


def _slurm_rank_world() -> tuple[int, int]:
    if "SLURM_ARRAY_TASK_ID" in os.environ:
        first = int(os.environ.get("SLURM_ARRAY_TASK_MIN", 0))
        return (int(os.environ["SLURM_ARRAY_TASK_ID"]) - first, int(os.environ.get("SLURM_ARRAY_TASK_COUNT", 1)))
    return int(os.environ.get("SLURM_PROCID", 0)), int(os.environ.get("SLURM_NTASKS", 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cuts", required=True, help="a prepared cuts.jsonl.gz (examples/prepare_data.py)")
    parser.add_argument("--out", required=True, help="the source's Shar folder (shards/ and meta/ go inside)")
    parser.add_argument("--codec", default=None, help="local X-Codec folder (HF format), or 'tiny'; not needed "
                        "for text sources")
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16, help="clips per codec forward pass")
    parser.add_argument("--shards", default=None, help="START:STOP shard range (default: split by rank/world)")
    parser.add_argument("--rank", type=int, default=None, help="default: Slurm array task / SLURM_PROCID")
    parser.add_argument("--world", type=int, default=None, help="default: Slurm array size / SLURM_NTASKS")
    parser.add_argument("--codec-tasks", default="tta", help="comma list of tasks to encode (default: tta)")
    parser.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    total = num_shards(count_cuts(args.cuts), args.shard_size)
    if args.shards:
        start, _, stop = args.shards.partition(":")
        shards = select_shards(total, shard_range=(int(start), int(stop or total)))
    else:
        rank, world = _slurm_rank_world()
        shards = select_shards(total, rank=args.rank if args.rank is not None else rank,
                               world=args.world if args.world is not None else world)
    codec = None
    if args.codec:
        model = build_tiny_xcodec(seed=0) if args.codec == "tiny" else None
        codec = (CodecTokenizer(model, max_batch_size=args.batch_size) if model is not None
                 else CodecTokenizer.from_pretrained(args.codec, max_batch_size=args.batch_size))
        codec.model.to(pick_device(args.device))
    report = tokenize_source(args.cuts, args.out, codec, shard_size=args.shard_size, shards=shards,
                             codec_tasks=tuple(args.codec_tasks.split(",")), progress=not args.no_progress)
    print(json.dumps({"shards_total": total, "written": len(report.shards_written),
                      "skipped_finished": len(report.shards_skipped), "cuts": report.num_cuts,
                      "rejects": report.num_rejects, "audio_seconds": round(report.audio_seconds, 1),
                      "audio_seconds_per_second": round(report.realtime_factor, 1)}))


if __name__ == "__main__":
    main()
