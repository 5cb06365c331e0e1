"""Self-reflection SFT data (UALM-Reason round 2) from a model: plan -> audio -> listen -> rich caption of the
result -> critique -> refined audio, one conversation record per prompt, ready for stage=sft.

    python examples/make_reflection_data.py --checkpoint dpo1/checkpoints --codec /models/xcodec \\
        --tokenizer /models/ualm-7b-hf --prompts prompts.jsonl --batch-size 16 --output reflection/

--prompts: the JSON lines of make_preference_pairs.py ({"id", "caption"} or {"id", "prompt": [...]}); the caption
(or the conversation's last user turn) is the request the model plans from. --output gets reflection.jsonl (the
records, format in ualm_nemo/data/conversation.py; codes verbatim under codes/, the heard clips under clips/),
and skipped.jsonl (prompts whose transcript has an empty or undecodable turn, with the reason). Rerun the same
command to resume: prompts in either file are skipped. The first, unrefined clip is not learned unless
--learn-first-audio. Rewrite the caption-of-the-result and critique turns with a stronger captioner / judge
before SFT-2 if you have one (any text is valid in the records).
"""

from __future__ import annotations

import argparse
import sys

from ualm_nemo.inference.cli import add_generation_args, add_model_args, check_paths, generation_config, \
    load_inference


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="make_reflection_data.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser, codec_required=True)
    add_generation_args(parser)
    parser.add_argument("--prompts", required=True, metavar="FILE.jsonl")
    parser.add_argument("--output", required=True, help="output folder (resumable)")
    parser.add_argument("--learn-first-audio", action="store_true", help="also learn the unrefined clip")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    from ualm_nemo.inference.reasoning import self_reflect
    from ualm_nemo.posttrain.preference_pairs import PairsError, read_prompts
    from ualm_nemo.posttrain.reflection_data import ReflectionFolder

    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = generation_config(args, parser)
    check_paths(args, parser)
    try:
        prompts = read_prompts(args.prompts)
        folder = ReflectionFolder(args.output)
    except (PairsError, ValueError) as err:
        parser.error(str(err))
    todo = [p for p in prompts if p.id not in folder.done]
    if len(todo) < len(prompts):
        print(f"resuming {args.output}: {len(prompts) - len(todo)} of {len(prompts)} prompts already done")
    written = skipped = 0
    line_of = {p.id: k for k, p in enumerate(prompts)}
    if todo:
        infer = load_inference(args, parser)
        if not infer.listens:
            parser.error("--checkpoint: self-reflection listens to its own audio; this model has no audio input")
        with tqdm(total=len(todo), desc="reflecting", unit="prompt", disable=args.no_progress) as bar:
            for start in range(0, len(todo), args.batch_size):
                batch = todo[start:start + args.batch_size]
                seeds = [args.seed + line_of[p.id] for p in batch]  # a prompt's seed: its line, any batch
                result = folder.add(self_reflect(infer, [p.caption for p in batch], seeds, cfg), [p.id for p in batch],
                                    args.learn_first_audio)
                written, skipped = written + result.written, skipped + len(result.skipped)
                bar.update(len(batch))
    print(f"done: {written} records written, {skipped} skipped (see skipped.jsonl), in {folder.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
