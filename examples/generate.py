r"""Text-to-audio: captions in, one wav per caption and a manifest out (one GPU, or the CPU).

    python examples/generate.py --checkpoint demo_out/checkpoints --codec demo_out/codec \
        --caption "a high beep" --caption "white noise" --out-dir generated/

    python examples/generate.py --checkpoint /models/ualm-7b-hf --codec /models/xcodec-hubert-general \
        --tokenizer /models/ualm-7b-hf --captions prompts.jsonl --batch-size 16 --device cuda --out-dir generated/

--checkpoint is a training checkpoint (a run's checkpoints/ folder or one iter_* folder, saved at any TP/PP) or
a folder exported by examples/convert_ualm_to_hf.py. --captions is a JSON-lines file, one object per line:

    {"caption": "a dog barks twice in a large hall", "id": "dog", "seed": 7}

``id`` and ``seed`` are optional: ids (letters, digits, '.', '_', '-': they name the wav) default to the item's
0-based position (00000, 00001, ...), seeds to --seed + position; --caption items come after the file's. Every
bad line (invalid JSON, no or empty caption, one over --max-caption-chars, a repeated id) is reported as
file:line before any model is loaded. Items are decoded --batch-size at a time (default 8); an item gives the
same audio alone or in any batch. Decoding runs on --device (default: cuda when there is a GPU).

--out-dir receives {id}.wav (16 kHz mono, 16-bit; 48 kHz stereo with --enhancer) per item and manifest.jsonl, one line per finished item:
id, caption, seed, cfg_scale, temperature, top_k, max_frames, min_frames, audio (the wav's file name),
sample_rate, frames, duration (s). A wav is written under a temporary name and renamed into place, and only then
is its manifest line appended (flushed to disk), so the manifest never lists a half-written file. A reply without
audio (none is expected: a text-to-audio turn is forced to end its audio by max_frames) is a line with "skipped",
counted in the summary, not a crash mid-run.

Re-running the same command resumes: items already in the manifest are skipped and the rest generated. If the
manifest holds an item with other settings (caption, seed, cfg scale, temperature, top-k, frame limits) the run
is refused; --overwrite starts over (or use a new --out-dir).

--shard K/N (or 'slurm' in an array job) generates every N-th item, from the K-th, into
<out-dir>/shard-K-of-N/; the same command without --shard then merges the finished shards into --out-dir and
generates whatever is still missing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ualm_nemo.inference.cli import add_enhancer_arg, add_generation_args, add_model_args, add_shard_arg, \
    check_paths, generation_config, load_inference, shard_of
from ualm_nemo.inference.audio_job import generate_clips, tta_settings
from ualm_nemo.inference.jobs import MANIFEST, JobError, ManifestConflict, OutputFolder, read_items
from ualm_nemo.inference.shards import shard_job


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="generate.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser, codec_required=True)
    add_generation_args(parser)
    parser.add_argument("--caption", action="append", default=[], help="a caption (repeatable)")
    parser.add_argument("--captions", metavar="FILE.jsonl",
                        help='JSON lines: {"caption": ..., "id": ..., "seed": ...}')
    parser.add_argument("--max-caption-chars", type=int, default=2000, help="longer captions are an error")
    add_enhancer_arg(parser)
    parser.add_argument("--out-dir", default="generated")
    parser.add_argument("--overwrite", action="store_true", help="discard the out dir's manifest and wavs first")
    add_shard_arg(parser)
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = generation_config(args, parser)  # every check before any work: nothing is written when one fails
    check_paths(args, parser)
    shard = shard_of(args, parser)
    if args.max_caption_chars < 1:
        parser.error(f"--max-caption-chars {args.max_caption_chars}: must be >= 1")
    if Path(args.out_dir).exists() and not Path(args.out_dir).is_dir():
        parser.error(f"--out-dir {args.out_dir}: exists and is not a folder")
    if not (args.caption or args.captions):
        parser.error("no captions: give --caption (repeatable) and/or --captions FILE.jsonl")
    try:
        items = read_items(args.captions, [(f"--caption #{k}", {"caption": c}) for k, c in enumerate(args.caption, 1)],
                           first_seed=args.seed, max_chars=args.max_caption_chars,
                           max_chars_name="--max-caption-chars")
        # what makes the audio: a rerun into the same folder must not mix in another model, dtype or sampling
        settings = tta_settings(cfg) | {"checkpoint": str(Path(args.checkpoint).resolve()),
                                        "dtype": args.dtype or "stored",
                                        "enhancer": args.enhancer and str(Path(args.enhancer).resolve())}
        folder_path, items, notes = shard_job(args.out_dir, items, settings, shard, args.overwrite)
        with OutputFolder(folder_path, settings) as folder:
            plan = folder.plan(items, overwrite=args.overwrite)
            for note in notes + plan.notes:
                print(note)
            if plan.done:
                print(f"resuming {folder.path}: {plan.done} of {len(items)} items already done (skipped), "
                      f"{len(plan.todo)} to generate")
            infer = load_inference(args, parser) if plan.todo else None  # folder untouched until loaded
            folder.prepare(plan)
            counts = generate_clips(infer, cfg, folder, plan.todo, args.batch_size, not args.no_progress)
    except ManifestConflict as err:
        parser.error(f"{err}: use --overwrite to start over, or a new --out-dir")
    except JobError as err:
        parser.error(str(err))
    no_audio = f", {counts.no_audio} without audio (recorded as skipped)" if counts.no_audio else ""
    if counts.refused:  # the manifest's skipped lines give each reason
        no_audio += f", {counts.refused} refused by the input checks (recorded as skipped, reason in {MANIFEST})"
    print(f"done: {counts.written} written{no_audio}, {plan.done} skipped (already done), in {folder.path} "
          f"({MANIFEST})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
