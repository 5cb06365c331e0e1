r"""Raw manifests -> prepared Lhotse cuts, one folder per source, every rejected entry written with its reason.

  python examples/prepare_data.py --out /data/prepared \
      --source audiocaps=tta:/raw/etta.jsonl --source af3=understanding:/raw/af3.json \
      --source text=text:/raw/text.jsonl
  # post-training: SFT conversations and DPO preference pairs (formats: ualm_nemo/data/conversation.py)
  python examples/prepare_data.py --out /data/prepared \
      --source sft=conversation:/raw/sft.jsonl --source dpo=preference:/raw/pairs.jsonl

Each --source is NAME=TASK:MANIFEST (TASK: tta | understanding | text | conversation | preference);
--max-duration SECONDS rejects longer audio (counted and listed like every other reject; for a conversation or
a pair: all its distinct clips together, the audio its one cut holds). Writes {out}/{NAME}/cuts.jsonl.gz,
rejects.jsonl and summary.json, then prints the counts. Next: examples/tokenize_audio.py on each cuts.jsonl.gz
(conversation / preference sources with written wav clips need --codec: each written clip is encoded).
"""

import argparse
import json
import sys
from pathlib import Path

from ualm_nemo.cli_numbers import positive_float
from ualm_nemo.data.cuts import TASKS, prepare_source


def parse_source(spec: str) -> tuple[str, str, str]:
    name, sep, rest = spec.partition("=")
    task, sep2, manifest = rest.partition(":")
    if not (sep and sep2 and name and manifest) or task not in TASKS:
        raise argparse.ArgumentTypeError(f"--source {spec!r}: expected NAME=TASK:MANIFEST with TASK in {TASKS}")
    return name, task, manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the prepared sources")
    parser.add_argument("--source", action="append", type=parse_source, required=True, metavar="NAME=TASK:MANIFEST")
    parser.add_argument("--max-duration", type=positive_float, default=None, metavar="SECONDS",
                        help="reject audio longer than this (a conversation / pair: its clips together; listed in "
                        "rejects.jsonl); default: no limit")
    args = parser.parse_args()
    names = [name for name, _, _ in args.source]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:  # the later one would overwrite the earlier one's folder, while the totals counted both
        parser.error(f"--source name(s) {', '.join(repeated)} given more than once: each source needs its own NAME")
    missing = [manifest for _, _, manifest in args.source if not Path(manifest).is_file()]
    if missing:
        parser.error(f"manifest(s) not found: {', '.join(missing)}")
    total_ok = total_bad = 0
    for name, task, manifest in args.source:
        report = prepare_source(task, manifest, Path(args.out) / name, name=name, max_duration=args.max_duration)
        total_ok, total_bad = total_ok + report.num_records, total_bad + report.num_rejects
        print(f"{name:>16} {task:>13}: {report.num_records} cuts, {report.num_rejects} rejected "
              f"({report.audio_seconds / 3600:.2f} h audio) -> {report.out_dir}")
        if report.num_rejects:
            print(f"{'':>32} reasons in {Path(report.out_dir) / 'rejects.jsonl'}")
    print(json.dumps({"cuts": total_ok, "rejects": total_bad}))
    sys.exit(0)


if __name__ == "__main__":
    main()
