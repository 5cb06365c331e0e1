"""Evaluate a UALM checkpoint. Suites: ``understanding`` (MMAU / MMAR audio question answering).

  python examples/evaluate.py understanding --benchmark mmau --data mmau-test-mini.json \
      --audio-root /data/mmau --checkpoint /ckpt/ualm-7b-hf --tokenizer /models/Qwen2.5-7B-Instruct \
      --out-dir eval/mmau

Every question is answered with the batched engine (greedy text; the prompt asks for the option's text), each
answer recorded as it comes (``manifest.jsonl``: rerun the same command to resume a killed run), then scored
with the official matching rule: ``report.json`` (accuracy, per task / difficulty / category / modality, every
item with its prediction and verdict) and ``report.md``. Malformed benchmark entries are listed and not scored;
an item whose audio cannot be read is counted as wrong, never dropped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ualm_nemo.eval import understanding
from ualm_nemo.eval.audio_qa import BREAKDOWNS, read_benchmark
from ualm_nemo.inference.cli import add_model_args, check_paths, load_inference
from ualm_nemo.inference.engine import GenerationConfig
from ualm_nemo.inference.jobs import JobError, ManifestConflict, OutputFolder


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evaluate.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", choices=["understanding"])
    add_model_args(parser)
    parser.add_argument("--benchmark", choices=sorted(BREAKDOWNS), required=True)
    parser.add_argument("--data", required=True, help="the benchmark's json list")
    parser.add_argument("--audio-root", help="folder the entries' audio paths are relative to (default: --data's)")
    parser.add_argument("--max-answer-tokens", type=int, default=64)
    parser.add_argument("--limit", type=int, help="the first N items only (a quick look; not a benchmark score)")
    parser.add_argument("--out-dir", default="eval_out")
    parser.add_argument("--overwrite", action="store_true", help="discard earlier answers in --out-dir")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_paths(args, parser)
    if args.max_answer_tokens < 1 or (args.limit is not None and args.limit < 1):
        parser.error("--max-answer-tokens and --limit must be >= 1")
    try:
        items, rejected = read_benchmark(args.data, args.benchmark, args.audio_root)
    except ValueError as err:
        parser.error(f"--data: {err}")
    if not items:
        parser.error(f"--data {args.data}: no usable entry ({len(rejected)} rejected, e.g. {rejected[0].reason})")
    items = items[: args.limit] if args.limit else items
    for r in rejected:
        print(f"rejected {r.where}: {r.reason}")
    cfg = GenerationConfig(max_text_tokens=args.max_answer_tokens)
    settings = {"benchmark": args.benchmark, "checkpoint": str(Path(args.checkpoint).resolve()),
                "dtype": args.dtype or "stored", "max_answer_tokens": args.max_answer_tokens}
    try:
        with OutputFolder(args.out_dir, settings) as folder:
            plan = folder.plan(understanding.job_items(items), overwrite=args.overwrite)
            for note in plan.notes:
                print(note)
            if plan.done:
                print(f"resuming {folder.path}: {plan.done} of {len(items)} already answered")
            infer = load_inference(args, parser) if plan.todo else None
            if infer is not None and not infer.listens:
                parser.error("this checkpoint has no audio input (model.audio_in.enabled=false)")
            folder.prepare(plan)
            if plan.todo:
                understanding.answer(infer, items, folder, plan.todo, args.batch_size, cfg, not args.no_progress)
            answered, skipped = understanding.predictions(folder)
    except ManifestConflict as err:
        parser.error(f"{err}: use --overwrite to start over, or a new --out-dir")
    except JobError as err:
        parser.error(str(err))
    ids = {i.id for i in items}
    skipped = {k: v for k, v in skipped.items() if k in ids}
    result = understanding.score(items, {k: v for k, v in answered.items() if k in ids})
    meta = {"benchmark": args.benchmark, "data": str(args.data), **settings, "limit": args.limit}
    json_path, md_path = understanding.report(result, rejected, skipped, meta, Path(args.out_dir))
    print(f"{args.benchmark}: {100 * result.accuracy:.2f} % ({result.correct} / {result.total}); "
          f"{len(rejected)} malformed entries not scored, {len(skipped)} unreadable counted wrong")
    print(f"report: {json_path} {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
