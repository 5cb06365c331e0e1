r"""Codec stage: prepared cuts -> Lhotse Shar shards with 16 kHz audio and X-Codec tokens (int16 [T, 8], 50 Hz).

  # one process, all shards (GPU when present)
  python examples/tokenize_audio.py --cuts /data/prepared/audiocaps/cuts.jsonl.gz --out /data/shar/audiocaps \
      --codec /models/xcodec-hubert-general
  # N processes or a Slurm array share the shards (each task picks every N-th shard)
  sbatch --array=0-15 --wrap "python examples/tokenize_audio.py --cuts ... --out ... --codec ..."
  # or an explicit range
  python examples/tokenize_audio.py ... --shards 0:40

Re-running skips finished shards (a killed run resumes; its temporary files are removed). The settings (shard
size, manifest, codec, codec tasks) are recorded in {out}/meta/stage.json: a rerun with others is refused. ``--codec tiny`` uses the tiny random codec (tests, demo).

Conversation and preference sources (post-training) always encode their written clips, each on its own
(--codec-tasks does not apply to them); their codes files are carried verbatim. ``--batch-size 1`` makes every
clip's codes independent of the clips it is batched with (a padded batch can change them).
"""

import argparse
import json
import logging
import os
from pathlib import Path

from ualm_nemo.cli_numbers import non_negative_int, positive_int
from ualm_nemo.data.stage_settings import StageSettings, StageSettingsError, check_or_record
from ualm_nemo.data.tokenize_stage import (check_cuts_manifest, count_cuts, num_shards, pick_device, select_shards,
                                          tokenize_source)
from ualm_nemo.codec.xcodec import CodecTokenizer, build_tiny_xcodec


def _slurm_rank_world() -> tuple[int, int]:
    if "SLURM_ARRAY_TASK_ID" in os.environ:
        first = int(os.environ.get("SLURM_ARRAY_TASK_MIN", 0))
        return (int(os.environ["SLURM_ARRAY_TASK_ID"]) - first, int(os.environ.get("SLURM_ARRAY_TASK_COUNT", 1)))
    return int(os.environ.get("SLURM_PROCID", 0)), int(os.environ.get("SLURM_NTASKS", 1))


def shard_range(text: str) -> tuple[int, int | None]:
    """"START:STOP" (STOP may be empty: to the end) -> (start, stop)."""
    start, sep, stop = text.partition(":")
    try:
        return int(start), (int(stop) if stop else None)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected START:STOP shard numbers, e.g. 0:40") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cuts", required=True, help="a prepared cuts.jsonl.gz (examples/prepare_data.py)")
    parser.add_argument("--out", required=True, help="the source's Shar folder (shards/ and meta/ go inside)")
    parser.add_argument("--codec", default=None, help="local X-Codec folder (HF format), or 'tiny'; not needed "
                        "for text sources")
    parser.add_argument("--shard-size", type=positive_int, default=1000, help="cuts per shard (recorded in the "
                        "output: a resume must use the same)")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="clips per codec forward pass")
    parser.add_argument("--shards", type=shard_range, default=None,
                        help="START:STOP shard range (default: split by rank/world)")
    parser.add_argument("--rank", type=non_negative_int, default=None, help="default: Slurm array task / SLURM_PROCID")
    parser.add_argument("--world", type=positive_int, default=None, help="default: Slurm array size / SLURM_NTASKS")
    parser.add_argument("--codec-tasks", default="tta", help="comma list of tasks to encode (default: tta; "
                        "conversation / preference sources always encode their written clips)")
    parser.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    if not Path(args.cuts).is_file():
        parser.error(f"--cuts {args.cuts}: no such file (examples/prepare_data.py writes it)")
    try:
        check_cuts_manifest(args.cuts)
    except ValueError as e:
        parser.error(f"--cuts {e}")
    num_cuts = count_cuts(args.cuts)
    total = num_shards(num_cuts, args.shard_size)
    try:
        if args.shards:
            start, stop = args.shards
            shards = select_shards(total, shard_range=(start, total if stop is None else stop))
        else:
            rank, world = _slurm_rank_world()
            shards = select_shards(total, rank=args.rank if args.rank is not None else rank,
                                   world=args.world if args.world is not None else world)
    except ValueError as e:
        parser.error(str(e))
    codec_name = args.codec if args.codec in (None, "tiny") else str(Path(args.codec).resolve())
    codec_tasks = tuple(args.codec_tasks.split(","))
    try:  # before the codec loads: a resume with other settings is refused at once
        check_or_record(args.out, StageSettings(shard_size=args.shard_size, num_cuts=num_cuts,
                                                codec_tasks=codec_tasks, codec=codec_name))
    except StageSettingsError as e:
        parser.error(str(e))
    codec = None
    if args.codec:
        model = build_tiny_xcodec(seed=0) if args.codec == "tiny" else None
        codec = (CodecTokenizer(model, max_batch_size=args.batch_size) if model is not None
                 else CodecTokenizer.from_pretrained(args.codec, max_batch_size=args.batch_size))
        codec.model.to(pick_device(args.device))
    report = tokenize_source(args.cuts, args.out, codec, shard_size=args.shard_size, shards=shards,
                             codec_tasks=codec_tasks, progress=not args.no_progress, codec_name=codec_name)
    print(json.dumps({"shards_total": total, "written": len(report.shards_written),
                      "skipped_finished": len(report.shards_skipped), "cuts": report.num_cuts,
                      "rejects": report.num_rejects, "audio_seconds": round(report.audio_seconds, 1),
                      "audio_seconds_per_second": round(report.realtime_factor, 1)}))


if __name__ == "__main__":
    main()
