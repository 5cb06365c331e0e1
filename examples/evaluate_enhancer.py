r"""Score the enhancer on a held-out set against plain sinc resampling (the channel duplicated):

  python examples/evaluate_enhancer.py --enhancer /ckpt/ualm-7b-hf/enhancer --data /data/heldout48k \
      [--codec /models/xcodec] --out-dir eval/enhancer

Writes report.json (every clip's LSD, LSD above 8 kHz, MR-STFT distance, low-band consistency, for both systems)
and report.md (the table). --data: a folder of audio files or a Lhotse recordings / cuts manifest.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ualm_nemo.enhance.data import read_clips
from ualm_nemo.enhance.evaluation import evaluate, write_report
from ualm_nemo.enhance.inference import Enhancer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="evaluate_enhancer.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--enhancer", required=True, help="exported folder, run folder or iter_*.ckpt")
    parser.add_argument("--data", required=True)
    parser.add_argument("--codec", help="X-Codec folder: score on codec-degraded input, as generated audio is")
    parser.add_argument("--max-seconds", type=float, default=10.0, help="score the first N seconds of each clip")
    parser.add_argument("--chunk-seconds", type=float, default=10.0)
    parser.add_argument("--out-dir", default="eval_enhancer")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if not args.max_seconds > 0:
        parser.error(f"--max-seconds {args.max_seconds}: must be > 0")
    try:
        enhancer = Enhancer.from_pretrained(args.enhancer, chunk_seconds=args.chunk_seconds,
                                            overlap_seconds=min(1.0, args.chunk_seconds / 4))
        clips = read_clips(args.data)
        codec = None
        if args.codec:
            from ualm_nemo.enhance.codec_round_trip import CodecRoundTrip
            codec = CodecRoundTrip.from_pretrained(args.codec)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    if not clips.cuts:
        parser.error(f"--data {args.data}: no usable clip ({len(clips.rejected)} rejected)")
    report = evaluate(enhancer, clips, args.max_seconds, codec, progress=not args.no_progress)
    if not report["clips"]:
        print(f"error: no clip could be scored ({report['skipped']} skipped)", file=sys.stderr)
        return 1
    settings = {"enhancer": str(Path(args.enhancer).resolve()), "data": str(Path(args.data).resolve()),
                "codec": args.codec, "max_seconds": args.max_seconds}
    json_path, md_path = write_report(report, args.out_dir, settings)
    e, b = report["enhancer"], report["baseline"]
    print(f"{report['clips']} clips scored, {report['skipped']} skipped: LSD above 8 kHz {e['lsd_high']:.3f} "
          f"(baseline {b['lsd_high']:.3f}), LSD {e['lsd']:.3f} (baseline {b['lsd']:.3f})")
    print(f"report: {json_path} {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
