"""Train (or resume) the 48 kHz stereo enhancement VAE: python examples/train_enhancer.py train.data=DIR [key=value ...]

Several processes: torchrun --nproc_per_node=N examples/train_enhancer.py ..., or srun under Slurm (one task per
GPU), or python -m launcher.submit --entry enhancer ... A run resumes from <output_dir>/checkpoints/latest.
Export the EMA weights for generation: python examples/export_enhancer.py --checkpoint <output_dir> --out DIR.
"""

from ualm_nemo import early_signals

early_signals.install()  # first: a Slurm signal during the imports below must requeue the job, not kill it

import logging  # noqa: E402
import sys  # noqa: E402

from omegaconf import DictConfig, OmegaConf  # noqa: E402

from ualm_nemo.enhance.config import EnhancerRun  # noqa: E402
from ualm_nemo.enhance.training import train_enhancer  # noqa: E402
from ualm_nemo.model.config import ConfigError  # noqa: E402
from ualm_nemo.training.hydra_entry import discard_run_folder, hydra_main  # noqa: E402


@hydra_main("enhancer", prog="train_enhancer.py")
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    values = OmegaConf.to_container(cfg, resolve=True)
    values.pop("hydra", None)
    try:
        run = EnhancerRun.from_dict(values)
    except (ConfigError, TypeError) as err:
        discard_run_folder()  # nothing ran: no Hydra run folder left behind
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    try:
        result = train_enhancer(run)
    except ConfigError as err:  # train.data missing, empty or without a usable clip: one line naming the key
        discard_run_folder()
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    logging.info("enhancer %s at step %d: %s; skipped crops %s", result.state, result.step,
                 {k: round(v, 4) for k, v in result.losses.items()}, result.skipped or "none")


if __name__ == "__main__":
    main()
