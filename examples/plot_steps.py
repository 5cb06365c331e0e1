"""Plot a run's metrics against the training step: one PNG per figure of <output_dir>/validation.jsonl and
<output_dir>/evaluation.jsonl (train.val_every_n_steps / train.eval_every_n_steps).

  python examples/plot_steps.py outputs/ualm            # -> outputs/ualm/plots/eval_clap.png, val_loss.png, ...
  python examples/plot_steps.py outputs/ualm --out-dir report/
"""

from __future__ import annotations

import argparse
import sys

from ualm_nemo.training.step_plots import plot_steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="plot_steps.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", help="the run's output_dir")
    parser.add_argument("--out-dir", help="where the PNGs go (default: OUTPUT_DIR/plots)")
    args = parser.parse_args(argv)
    try:
        written = plot_steps(args.output_dir, args.out_dir)
    except FileNotFoundError as err:
        parser.error(str(err))
    for path in written:
        print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
