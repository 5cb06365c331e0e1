"""The Hydra commands' shared entry (examples/train.py, score_reference.py, train_enhancer.py).

Hydra creates its run folder under ``output_dir`` (conf/*.yaml: ``hydra.run.dir``) before the task function
runs, so an ``output_dir=`` override that cannot be created (``/proc/x``, a path under a regular file) ended in
Hydra's own traceback. ``hydra_main`` checks that override first and refuses it in one line naming the key.

A config that training's own checks refuse would leave an empty-looking run folder behind (and, for a mistyped
``output_dir``, the mistyped folder itself): ``discard_run_folder`` removes it, and the folders above it that it
leaves empty (at most two: ``hydra/`` and ``output_dir``, or the date folder).
"""

from __future__ import annotations

import functools
import inspect
import logging
import re
import shutil
import sys
from pathlib import Path
from typing import Callable, Sequence

import hydra

_OUTPUT_DIR = re.compile(r"^\+{0,2}output_dir=(.*)$")


def output_dir_override(argv: Sequence[str]) -> str | None:
    """The command line's ``output_dir=`` value (the last one, as Hydra applies them), None if absent."""
    values = [m.group(1) for m in map(_OUTPUT_DIR.match, argv) if m]
    return values[-1] if values else None


def refuse_bad_output_dir(argv: Sequence[str], prog: str) -> None:
    """Exit with ``{prog}: error: output_dir=...`` if the override cannot be created or written. A value with an
    interpolation (``${...}``) is left to the run's own check, after Hydra resolves it."""
    from ualm_nemo.model.config import ConfigError
    from ualm_nemo.training.run_config import check_output_dir

    value = output_dir_override(argv)
    if value is None or "${" in value:
        return
    try:
        check_output_dir(value.strip("'\""))
    except ConfigError as err:
        sys.exit(f"{prog}: error: {err}")


def hydra_main(config_name: str, prog: str) -> Callable[[Callable], Callable[[], None]]:
    """``hydra.main`` on the repository's conf/ (``../conf`` from the task's file, as an absolute path: Hydra
    resolves a relative one against the module name, which fails when a test loads the script as a module) that
    refuses a bad ``output_dir=`` override before Hydra creates anything."""
    def wrap(task: Callable) -> Callable[[], None]:
        conf = Path(inspect.getfile(task)).resolve().parent.parent / "conf"
        run = hydra.main(config_path=str(conf), config_name=config_name, version_base=None)(task)

        @functools.wraps(task)
        def entry() -> None:
            refuse_bad_output_dir(sys.argv[1:], prog)
            run()
        return entry
    return wrap


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

