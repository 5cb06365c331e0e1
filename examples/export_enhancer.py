"""Export an enhancer run's EMA weights as a folder (config.json + model.safetensors), e.g. into the HF folder:

  python examples/export_enhancer.py --checkpoint outputs/enhancer --out /ckpt/ualm-7b-hf/enhancer
"""

from __future__ import annotations

import argparse
import sys

from ualm_nemo.enhance.export import load_enhancer, save_enhancer
from ualm_nemo.enhance.model import parameter_count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="export_enhancer.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="an enhancer run, its checkpoints/ or one iter_*.ckpt")
    parser.add_argument("--out", required=True)
    parser.add_argument("--raw", action="store_true", help="the trained weights instead of their EMA")
    args = parser.parse_args(argv)
    try:
        model = load_enhancer(args.checkpoint, use_ema=not args.raw)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    folder = save_enhancer(model, args.out)
    print(f"exported the enhancer ({parameter_count(model):,} parameters, {'raw' if args.raw else 'EMA'} weights) "
          f"to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
