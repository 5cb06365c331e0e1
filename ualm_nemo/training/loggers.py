"""Where the training figures go: TensorBoard always, Weights & Biases when ``logger.wandb`` is set.

W&B is optional and off by default; with ``WANDB_MODE=offline`` it writes its run files under ``logger.wandb.dir``
without a network or an account (``wandb sync`` uploads them later), which is how a compute node without internet
access uses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from ualm_nemo.config_types import build_section
from ualm_nemo.model.config import ConfigError

if TYPE_CHECKING:  # lightning is imported only to build loggers: the config stays cheap to import
    from lightning.pytorch.loggers import Logger


@dataclass(kw_only=True)
class WandbConfig:
    project: str
    name: str | None = None  # the run's name in the project (default: W&B's generated one)
    dir: str | None = None  # where W&B writes its files (default: <output_dir>/wandb)


@dataclass(kw_only=True)
class LoggerConfig:
    wandb: WandbConfig | None = None  # off by default


def logger_config(values: Mapping[str, Any] | None) -> LoggerConfig:
    """The ``logger`` section, its keys checked like every other section's."""
    values = dict(values or {})
    unknown = sorted(set(values) - {"wandb"})
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(f'logger.{k}' for k in unknown)}; known: wandb")
    wandb = values.get("wandb")
    return LoggerConfig(wandb=build_section(WandbConfig, wandb, "logger.wandb") if wandb is not None else None)


def build_loggers(output_dir: str, cfg: LoggerConfig) -> list["Logger"]:
    """TensorBoard under <output_dir>/tensorboard, then W&B if configured (every logger gets every figure)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    loggers: list["Logger"] = [TensorBoardLogger(output_dir, name="tensorboard", version="")]
    if cfg.wandb is not None:
        folder = Path(cfg.wandb.dir or Path(output_dir) / "wandb")
        folder.mkdir(parents=True, exist_ok=True)
        loggers.append(_wandb_logger()(project=cfg.wandb.project, name=cfg.wandb.name, save_dir=str(folder)))
    return loggers


def _wandb_logger() -> type["Logger"]:
    """Lightning's WandbLogger, closing its run when training ends: it otherwise stays open until interpreter exit,
    which a process that ends by os._exit (a multiprocessing worker, a rank srun kills) never reaches, leaving
    offline files without the history."""
    from lightning.pytorch.loggers import WandbLogger

    class FinishingWandbLogger(WandbLogger):
        def finalize(self, status: str) -> None:
            super().finalize(status)
            if self._experiment is not None and hasattr(self._experiment, "finish"):
                self._experiment.finish(exit_code=0 if status == "success" else 1)

    return FinishingWandbLogger
