"""make demo: train a tiny UALM on synthetic data on CPU, then generate audio for a caption."""

import argparse

from ualm_nemo.cli_numbers import positive_int
from ualm_nemo.demo import run_demo
from ualm_nemo.model.config import ConfigError


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output-dir", default="demo_out", help="a second run here reports the finished run "
                        "and generates again")
    parser.add_argument("--max-steps", type=positive_int, default=300)
    args = parser.parse_args(argv)
    try:
        result = run_demo(args.output_dir, args.max_steps)
    except ConfigError as e:  # e.g. an output dir that cannot be written: one line, not a traceback
        parser.error(str(e))
    print("\n=== UALM demo finished ===")
    print(f"training data      {result['data']}")
    if result["final_loss"] is None:  # a rerun: the run in --output-dir had already finished
        print(f"checkpoints        {result['checkpoints']}  (already trained to step {result['step']}: nothing "
              f"trained this time; remove {args.output_dir}/ to train again)")
    else:
        print(f"checkpoints        {result['checkpoints']}  (final loss {result['final_loss']:.3f})")
    print(f"tensorboard logs   {result['tensorboard']}")
    print(f"validation         {result['validation']}  (plots: .venv/bin/python examples/plot_steps.py "
          f"{args.output_dir})")
    print(f"generated audio    {result['wav']}  ({result['frames']} codec frames, {result['seconds']:.2f} s) "
          f"for the caption {result['caption']!r}")
    if result["answer"]:
        qa = result["answer"]
        print(f"audio question     {qa['question']!r} -> {qa['answer']!r} (reference {qa['reference']!r})")


if __name__ == "__main__":  # required: checkpoint writers start helper processes that re-import this module
    main()
