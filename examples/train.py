"""Train (or resume) a UALM stage: python examples/train.py [model=...] [stage=...] [key=value ...].

Single process: run it directly. Several processes: torchrun --nproc_per_node=N examples/train.py ..., or srun
under Slurm (one task per GPU; ranks come from SLURM_*). A run resumes from <output_dir>/checkpoints/latest.
"""

from ualm_nemo import early_signals

early_signals.install()  # first: a Slurm signal during the imports below must requeue the job, not kill it

import logging  # noqa: E402
import sys  # noqa: E402

from omegaconf import DictConfig, OmegaConf  # noqa: E402

from ualm_nemo.model.config import ConfigError  # noqa: E402
from ualm_nemo.training.hydra_entry import discard_run_folder, hydra_main  # noqa: E402
from ualm_nemo.training.train import train  # noqa: E402


@hydra_main("train", prog="train.py")
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        model = train(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True))
    except ConfigError as e:  # a bad key or value: one line naming it, not a traceback
        discard_run_folder()  # nothing ran: no Hydra run folder left behind
        sys.exit(f"train.py: error: {e}")
    if model.last_result is None:
        logging.info("nothing to train: the run had already reached step %d (train.max_steps)", model.engine.step)
    else:
        logging.info("finished at step %d, loss %.4f", model.engine.step, model.last_result.loss)


if __name__ == "__main__":  # required: checkpoint writers start helper processes that re-import this module
    main()
