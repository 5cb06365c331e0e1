r"""Write RANDOM-weight metric checkpoints for ``evaluate.py tta`` (to try the command before the real ones are
downloaded elsewhere: the scores they give mean nothing).

    .venv/bin/python examples/make_random_metric_checkpoints.py metric_models_random
    .venv/bin/python examples/evaluate.py tta --generated gen/ --data set.jsonl --out-dir eval/try \
        <the flags it prints, also the last line of metric_models_random/RANDOM_WEIGHTS.txt>

Writes OpenL3, PaSST, PANNs, CLAP (+ its tokenizer folder) and AudioBox-Aesthetics checkpoints at their real
sizes, in their release formats and file names, plus RANDOM_WEIGHTS.txt saying they are random and listing the
evaluate.py tta flags (also printed). Offline; about 1.2 GB.
"""

import argparse
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="folder to write (created; must be empty or absent unless --overwrite)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--overwrite", action="store_true", help="write into a folder that already holds files")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not args.overwrite)):
        print(f"error: {out} exists and is {'not a folder' if not out.is_dir() else 'not empty'} "
              "(pass --overwrite, or name a new folder)", file=sys.stderr)
        return 2
    from ualm_nemo.testing.metric_models import RANDOM_NOTE, evaluate_flags, write_random_metric_models

    try:
        paths = write_random_metric_models(out, seed=args.seed)
    except OSError as err:
        print(f"error: cannot write {out}: {err}", file=sys.stderr)
        return 2
    print(f"wrote RANDOM-weight metric checkpoints to {out} (scores from them mean nothing; see {out / RANDOM_NOTE})")
    print("evaluate.py tta flags: " + " ".join(evaluate_flags(paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
