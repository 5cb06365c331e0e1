"""Build the Lightning Trainer around the Megatron strategy and run (or resume) a training stage."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from lightning.pytorch import Trainer

from ualm_nemo.distributed.checkpoint import remove_partial
from ualm_nemo.distributed.checkpoint_check import find_resumable
from ualm_nemo.distributed.parallel import launch_layout
from ualm_nemo import early_signals
from ualm_nemo.training.callbacks import PeriodicCheckpoint, StepProgressBar
from ualm_nemo.model.config import ConfigError
from ualm_nemo.early_signals import write_run_state
from ualm_nemo.training.nemo_model import NonFiniteLossError, UALMModel
from ualm_nemo.training.preemption import PreemptionCheckpoint
from ualm_nemo.training.run_config import RunConfig, check_local_paths, run_config_from_dict
from ualm_nemo.training.strategy import MegatronStrategy
from ualm_nemo.training.throughput import ThroughputMonitor
from ualm_nemo.training.loggers import build_loggers
from ualm_nemo.training.watchdog import HangWatchdog

log = logging.getLogger(__name__)

# errors that a restart from the latest checkpoint would repeat (bit-exact resume): the job stops with the reason
DETERMINISTIC_ERRORS = (NonFiniteLossError, ConfigError)


def checkpoint_dir(run: RunConfig) -> Path:
    return Path(run.output_dir) / "checkpoints"


def build_trainer(run: RunConfig) -> Trainer:
    _, world, per_node, nodes = launch_layout()
    run.validate(world)
    strategy = MegatronStrategy(run.model.parallel, run.train.seed, keep_last=run.train.keep_last_checkpoints,
                                async_save=run.train.async_save)
    t = run.train
    callbacks = [ThroughputMonitor(t.log_every_n_steps),  # first (throughput.py)
                 PeriodicCheckpoint(checkpoint_dir(run), t.checkpoint_every_n_steps, t.stop_at_step),
                 StepProgressBar(), PreemptionCheckpoint(run.output_dir)]
    if t.hang_timeout_s > 0:
        callbacks.append(HangWatchdog(t.hang_timeout_s, t.startup_timeout_s, t.save_timeout_s))
    return Trainer(
        accelerator="gpu" if torch.cuda.is_available() else "cpu", devices=per_node, num_nodes=nodes,
        strategy=strategy, max_steps=run.train.max_steps, max_epochs=-1,
        logger=build_loggers(run.output_dir, run.logger),
        callbacks=callbacks,
        log_every_n_steps=run.train.log_every_n_steps, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0,
        limit_val_batches=0)  # validation runs inside the training step (train.val_every_n_steps, validation.py)


def _record_failure(run: RunConfig, model: UALMModel | None, err: BaseException) -> None:
    """Tell the batch script not to restart: a restart from the latest checkpoint would end the same way.

    Only inside a Slurm job (the batch script is the reader) and into its existing output folder (its logs are
    there); a refused local run leaves nothing behind."""
    if "SLURM_JOB_ID" not in os.environ or not Path(run.output_dir).is_dir():
        return
    engine = getattr(model, "engine", None)
    write_run_state(run.output_dir, "failed", engine.step if engine is not None else 0, run.train.max_steps,
                    reason=f"{type(err).__name__}: {err}")


def train(cfg: Mapping[str, Any]) -> UALMModel:
    """Train (or resume from the run's latest checkpoint) the stage described by a run config dict."""
    cfg = dict(cfg)
    run = run_config_from_dict(cfg)
    try:
        check_local_paths(run)
    except ConfigError as err:
        _record_failure(run, None, err)
        raise
    # a Slurm signal that came during start-up (or comes before training does) requeues the job right away
    rank = launch_layout()[0]
    early_signals.arm(run.output_dir, run.train.max_steps, rank)
    model: UALMModel | None = None
    try:
        trainer = build_trainer(run)
        model = UALMModel(run, trainer=trainer)
        if rank == 0:  # before any rank saves: the partial folders of a save that was killed go
            for partial in remove_partial(checkpoint_dir(run)):
                log.warning("removed %s: a checkpoint save that did not complete", partial)
        latest = find_resumable(checkpoint_dir(run))
        if latest is not None:
            log.info("resuming from %s", latest)
        trainer.fit(model, ckpt_path=str(checkpoint_dir(run)) if latest is not None else None)
    except DETERMINISTIC_ERRORS as err:
        _record_failure(run, model, err)
        raise
    return model
