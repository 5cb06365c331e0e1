"""make posttrain-demo: the post-training recipe on CPU, tiny (ualm_nemo/posttrain/demo.py says what runs).

    pre-train -> SFT-1 -> preference pairs -> reference -> DPO-1 -> self-reflection data -> SFT-2 -> pairs ->
    reference -> DPO-2
"""

import argparse
import logging

from ualm_nemo.posttrain.demo import DemoSizes, run_posttrain_demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="posttrain_demo_out")
    d = DemoSizes()
    for name in ("pretrain_steps", "sft_steps", "dpo_steps", "prompts", "candidates", "max_frames"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name),
                            help=f"(default {getattr(d, name)})")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sizes = DemoSizes(**{k: getattr(args, k) for k in ("pretrain_steps", "sft_steps", "dpo_steps", "prompts",
                                                        "candidates", "max_frames")})
    result = run_posttrain_demo(args.output_dir, sizes)
    print("\n=== UALM post-training demo finished ===")
    for stage in ("pretrain", "sft1", "dpo1", "sft2", "dpo2"):
        s = result[stage]
        loss = "already trained (nothing trained this time)" if s["loss"] is None else \
            f"loss {s['first_loss']:.3f} -> {s['loss']:.3f}"
        extra = f", margin {s['margin']:+.4f}, accuracy {s['accuracy']:.2f}" if "margin" in s else ""
        rejects = f", {s['rejects']} records rejected (logged)" if s["rejects"] else ""
        print(f"{stage:<9} step {s['step']:>3}  {loss}{extra}{rejects}  ({s['checkpoints']})")
    for name in ("pairs1", "pairs2"):
        r = result[name]
        print(f"{name:<9} {r['pairs']} pairs of {r['prompts']} prompts ({result['output_dir'] / name / 'pairs.jsonl'})")
    refl = result["reflection"]
    print(f"reflection {refl['records']} self-reflection conversations, {len(refl['skipped'])} skipped "
          f"({result['output_dir'] / 'reflection' / 'reflection.jsonl'})")


if __name__ == "__main__":  # required: checkpoint writers start helper processes that re-import this module
    main()
