"""Preference pairs from the model itself: K candidates per prompt, scored by CLAP and AudioBox-Aesthetics, best vs
worst -> DPO pairs.

    python examples/make_preference_pairs.py --checkpoint /models/ualm-7b-hf --codec /models/xcodec \\
        --tokenizer /models/ualm-7b-hf --prompts prompts.jsonl --num-candidates 4 --batch-size 16 \\
        --clap /models/630k-audioset-fusion-best.pt --clap-tokenizer /models/roberta-base \\
        --aes /models/audiobox-aesthetics/checkpoint.pt --output dpo_pairs/

--prompts: JSON lines, one prompt each, with an "id" (letters, digits, '.', '_', '-': it names the candidates'
folder and seeds them):

    {"id": "dog", "caption": "a dog barks twice in a large hall"}
    {"id": "rain2", "prompt": [{"role": "user", "content": "make me a rain sound"}], "caption": "rain"}

A "prompt" is the conversation the candidates continue (text turns; the last is not the assistant's); "caption"
(default: its last user turn) is what CLAP compares the audio with. Every bad line (invalid JSON, no id, an empty
caption, a repeated id, ...) is reported as file:line before any model is loaded.

Candidates: --num-candidates K (>= 2) per prompt, sampled with --cfg-scale / --temperature / --top-k (> 1: greedy
decoding would give K equal candidates); candidate k of prompt p is seeded from (--seed, p, k), so a rerun
reproduces it, alone or in any batch. --batch-size conversations are decoded together: all K candidates of
batch-size // K prompts per call. --mode audio (default) forces audio (text-to-audio); --mode auto lets the model
write text too (kept as text parts, in order; a candidate without audio is not scored).

Rule: combined score = sum of weight x metric over --metric NAME=WEIGHT (repeatable; metrics: clap, aes_ce,
aes_cu, aes_pc, aes_pq; default clap=1.0 aes_pq=0.25: CLAP leads, production quality breaks near-ties);
chosen = best, rejected = worst; a prompt whose margin (best - worst) is 0 or under --min-margin (default 0),
or with fewer than two scored candidates, gives no pair and is counted in report.json. Every score of every given
metric model is kept (candidates.jsonl), weighted or not. Metric models are local files, never downloaded.

Targeted pairs (DPO-2): --select-worst N scores the whole pool as above, then pairs only the N prompts where the
model does worst: --select-by best (default) = the lowest best-candidate combined score, spread = the largest
best - worst; only prompts with two or more scored candidates are ranked, ties keep file order. N over the pool
keeps them all (said so). The selection is computed once every prompt is scored, from the recorded scores (so a
rerun selects the same prompts) and stated in report.json ("selection": rule, N, pool size, threshold, ids).

--output receives candidates/<id>/<k>.npy (the codes, int16 [F, 8]) and <k>.wav, candidates.jsonl, pairs.jsonl,
report.json and settings.json (see ualm_nemo/posttrain/preference_pairs.py). Rerunning the same command resumes
(finished prompts are skipped; with nothing left, no model is loaded); other settings over the same folder are
refused.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ualm_nemo.inference.cli import add_generation_args, add_model_args, check_paths, generation_config, \
    load_inference
from ualm_nemo.posttrain import preference_pairs as pp

GENERATION = ("cfg_scale", "temperature", "top_k", "max_frames", "min_frames", "max_text_tokens")
FLAGS = {"checkpoint": "--checkpoint", "codec": "--codec", "tokenizer": "--tokenizer", "dtype": "--dtype",
         "num_candidates": "--num-candidates", "seed": "--seed", "mode": "--mode",
         **{f"generation.{k}": "--" + k.replace("_", "-") for k in GENERATION},
         "metric_models.clap": "--clap", "metric_models.clap_tokenizer": "--clap-tokenizer",
         "metric_models.clap_seed": "--clap-seed", "metric_models.aes": "--aes",
         "rule.name": "--rule", "rule.weights": "--metric", "rule.min_margin": "--min-margin",
         "selection": "--select-worst", "selection.worst": "--select-worst", "selection.by": "--select-by"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="make_preference_pairs.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser, codec_required=True)
    add_generation_args(parser)
    parser.add_argument("--prompts", required=True, metavar="FILE.jsonl",
                        help='JSON lines: {"id", "caption"} or {"id", "prompt": [{"role", "content"}, ...]}')
    parser.add_argument("--num-candidates", type=int, default=4, help="candidates per prompt, >= 2 (default 4)")
    parser.add_argument("--mode", choices=["audio", "auto"], default="audio",
                        help="audio: forced (text-to-audio); auto: the model may write text too")
    parser.add_argument("--metric", action="append", default=[], metavar="NAME=WEIGHT",
                        help=f"a weighted metric of the combined score (repeatable; {', '.join(pp.METRICS)}; "
                             "default clap=1.0 aes_pq=0.25)")
    parser.add_argument("--rule", choices=pp.RULES, default=pp.RULES[0])
    parser.add_argument("--min-margin", type=float, default=0.0,
                        help="skip a prompt whose best - worst combined score is below this (default 0)")
    parser.add_argument("--select-worst", type=int, metavar="N",
                        help="targeted pairs (DPO-2): pair only the N prompts of the pool where the model does worst")
    parser.add_argument("--select-by", choices=pp.SELECT_BY, default=None,
                        help="with --select-worst: best = lowest best-candidate score (default), spread = largest "
                             "best - worst")
    parser.add_argument("--clap", help="LAION-CLAP 630k-audioset-fusion-best.pt (for clap)")
    parser.add_argument("--clap-tokenizer", help="local roberta-base tokenizer folder (vocab.json, merges.txt)")
    parser.add_argument("--clap-seed", type=int, default=0, help="seed of CLAP's fusion crops (clips > 10 s)")
    parser.add_argument("--aes", help="audiobox-aesthetics checkpoint.pt (for aes_ce / aes_cu / aes_pc / aes_pq)")
    parser.add_argument("--max-caption-chars", type=int, default=2000, help="longer texts are an error")
    parser.add_argument("--output", required=True, help="output folder (resumable)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def _resolved(path: str | None) -> str | None:
    return str(Path(path).resolve()) if path else None


def _check_metric_models(args, parser, weights) -> None:
    """Each model a weighted metric needs, and each one given, is an existing local file."""
    from ualm_nemo.eval.checkpoints import MetricModelError, require_file

    for name in ("clap", "aes"):
        users = [m for m in weights if pp.MODEL_OF[m] == name]
        if getattr(args, name) is None:
            if users:
                parser.error(f"--{name}: no checkpoint given, and --metric {', '.join(users)} needs it (metric "
                             "models are local files, never downloaded)")
            continue
        try:
            require_file(getattr(args, name), f"--{name}")
        except MetricModelError as err:
            parser.error(str(err))
    if args.clap and not (args.clap_tokenizer and (Path(args.clap_tokenizer) / "vocab.json").is_file()):
        parser.error(f"--clap-tokenizer {args.clap_tokenizer}: not a local RoBERTa tokenizer folder (vocab.json + "
                     "merges.txt of roberta-base); CLAP needs it")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = generation_config(args, parser)  # every check before any work: nothing is written when one fails
    check_paths(args, parser)
    if args.num_candidates < 2:
        parser.error(f"--num-candidates {args.num_candidates}: must be >= 2 (a pair needs two candidates)")
    if cfg.temperature == 0 or cfg.top_k == 1:
        parser.error(f"--temperature {cfg.temperature} / --top-k {cfg.top_k}: greedy decoding gives K equal "
                     "candidates (use a temperature > 0 and a top-k of 0 or > 1)")
    if args.max_caption_chars < 1:
        parser.error(f"--max-caption-chars {args.max_caption_chars}: must be >= 1")
    if Path(args.output).exists() and not Path(args.output).is_dir():
        parser.error(f"--output {args.output}: exists and is not a folder")
    try:
        weights = pp.parse_weights(args.metric)
        rule = pp.Rule(weights, args.min_margin, args.rule)
    except pp.PairsError as err:
        parser.error(str(err))
    _check_metric_models(args, parser, weights)
    selection = _selection(args, parser)
    settings = {"checkpoint": _resolved(args.checkpoint), "codec": _resolved(args.codec),
                "tokenizer": args.tokenizer if args.tokenizer == "byte" else _resolved(args.tokenizer),
                "dtype": args.dtype or "stored", "num_candidates": args.num_candidates, "seed": args.seed,
                "mode": args.mode, "generation": {k: getattr(cfg, k) for k in GENERATION},
                "metric_models": {"clap": _resolved(args.clap), "clap_tokenizer": _resolved(args.clap_tokenizer),
                                  "clap_seed": args.clap_seed, "aes": _resolved(args.aes)},
                "rule": rule.to_json(), "selection": selection.to_json() if selection else None}
    try:
        prompts = pp.read_prompts(args.prompts, args.max_caption_chars)
        with pp.PairsFolder(args.output, settings, FLAGS) as folder:
            folder.check_settings()
            plan = folder.plan(prompts)
            for note in plan.notes:
                print(note)
            if plan.done:
                print(f"resuming {folder.path}: {plan.done} of {len(prompts)} prompts already done (skipped), "
                      f"{len(plan.todo)} to generate")
            infer = scorer = None
            if plan.todo:  # the folder stays untouched until everything has loaded
                infer = load_inference(args, parser)
                scorer = pp.Scorer.load({"clap": args.clap, "aes": args.aes}, args.device, args.clap_tokenizer,
                                        args.clap_seed)
            folder.prepare(plan)
            written = _generate(infer, cfg, folder, plan.todo, scorer, rule, args)
            report = folder.finish(rule, _metric_models(args, scorer),
                                   {"prompts_generated": written, "prompts_already_done": plan.done}, selection)
    except pp.PairsError as err:
        parser.error(str(err))
    except ValueError as err:  # MetricModelError (a file that is not the model it should be)
        from ualm_nemo.eval.checkpoints import MetricModelError

        if not isinstance(err, MetricModelError):
            raise
        parser.error(str(err))
    if selection is not None:
        print(_selection_line(report["selection"]))
    skipped = ", ".join(f"{n} {r}" for r, n in report["skipped"].items() if n) or "none"
    print(f"done: {written} prompts generated, {plan.done} already done; {report['pairs']} pairs of "
          f"{report['prompts']} prompts (skipped: {skipped}), in {folder.path} ({pp.PAIRS})")
    return 0


def _selection(args, parser) -> pp.Selection | None:
    """--select-worst / --select-by -> the Selection (None: every prompt is paired); a bad value is one line."""
    if args.select_worst is None:
        if args.select_by is not None:
            parser.error(f"--select-by {args.select_by}: only with --select-worst N")
        return None
    try:
        return pp.Selection(args.select_worst, args.select_by or pp.SELECT_BY[0])
    except pp.PairsError as err:
        parser.error(str(err))


def _selection_line(info: dict) -> str:
    """How the targeted prompts were picked, in one line (report.json has the ids)."""
    kept = (f"keeping all {info['selected']}" if info["keeps_all"] else
            f"kept the {info['selected']} worst (threshold {info['threshold']:.4g})")
    unrankable = (f", {info['unrankable']} with fewer than two scored candidates not ranked"
                  if info["unrankable"] else "")
    return (f"selection: --select-worst {info['worst']} by {info['by']} ({info['rule']}) over a pool of "
            f"{info['pool']} prompts{unrankable}: {kept}")


def _generate(infer, cfg, folder, todo, scorer, rule, args) -> int:
    from tqdm import tqdm

    with tqdm(total=len(todo), desc="prompts", unit="prompt", disable=args.no_progress) as bar:
        return pp.generate(infer, cfg, folder, todo, scorer, rule, args.seed, args.mode, args.batch_size, bar.update)


def _metric_models(args, scorer) -> dict:
    """Each metric model file used: path and sha256 (and CLAP's tokenizer and crop seed)."""
    from ualm_nemo.eval.checkpoints import sha256

    if scorer is not None:
        models = scorer.models.checksums()
    else:
        models = {n: {"path": _resolved(getattr(args, n)), "sha256": sha256(getattr(args, n))}
                  for n in ("clap", "aes") if getattr(args, n)}
    if "clap" in models:
        models["clap"].update(tokenizer=_resolved(args.clap_tokenizer), seed=args.clap_seed)
    return models


if __name__ == "__main__":
    sys.exit(main())
