r"""Score a DPO run's reference once: python examples/score_reference.py stage=dpo train.init_from=SFT_RUN/checkpoints \
    data.dpo_manifest=PAIRS dpo.reference_checkpoint=SFT_RUN/checkpoints dpo.reference_logps=OUT.json [key=value ...]

Same config (conf/train.yaml + overrides) as the DPO run it serves; any layout (torchrun / srun for several
processes). Writes the sidecar dpo.reference_logps with a fingerprint that the DPO run checks.
"""

import logging
import sys

from omegaconf import DictConfig, OmegaConf

from ualm_nemo.model.config import ConfigError
from ualm_nemo.training.hydra_entry import hydra_main


@hydra_main("train", prog="score_reference.py")
def main(cfg: DictConfig) -> None:
    from ualm_nemo.distributed.parallel import init_distributed, teardown
    from ualm_nemo.posttrain.score_reference import score_reference, scoring_run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    values = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    try:
        scoring_run(values)  # before any process group: a missing folder or key is one line, at once
    except ConfigError as e:
        sys.exit(f"score_reference.py: error: {e}")
    init_distributed()
    try:
        score_reference(values)
    except ConfigError as e:
        sys.exit(f"score_reference.py: error: {e}")
    finally:
        teardown()


if __name__ == "__main__":
    main()
