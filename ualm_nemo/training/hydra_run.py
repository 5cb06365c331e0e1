"""The Hydra run folder of a launch that was refused: nothing ran, so nothing is kept.

Hydra makes the run folder (``<output_dir>/hydra/<date>_<time>/`` for examples/train.py, conf/train.yaml) before
the task function starts, so a config that training's own checks refuse would leave an empty-looking run behind
(and, for a mistyped ``output_dir``, the mistyped folder itself). ``discard_run_folder`` removes it, and the
folders above it that it leaves empty (at most two: ``hydra/`` and ``output_dir``, or the date folder).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path


def discard_run_folder() -> Path | None:
    """Remove this launch's Hydra run folder (see the module docstring); returns it (None outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    for handler in logging.getLogger().handlers[:]:  # Hydra's <task>.log file handler writes into it
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).is_relative_to(run_dir):
            logging.getLogger().removeHandler(handler)
            handler.close()
    shutil.rmtree(run_dir, ignore_errors=True)
    for parent in (run_dir.parent, run_dir.parent.parent):
        try:
            parent.rmdir()  # only when empty
        except OSError:
            break
    return run_dir
