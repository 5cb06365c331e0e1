"""A thin Megatron strategy for Lightning (NeMo 3.0 ships none): process groups in, wrapping and I/O out.

What it changes relative to Lightning's DDPStrategy, and why:
* after torch.distributed is up, Megatron's parallel_state is initialised for the configured TP/PP sizes;
* the module is not wrapped in torch DDP: the model class builds Megatron DDP + optimizer in ``configure_model``;
* checkpoints are Megatron distributed checkpoints written by every rank through the engine (the Lightning
  loop state rides along inside them), and restoring happens after set-up, when the optimizer exists;
  with ``async_save`` they are written in the background (distributed/async_save.py): the callbacks publish them
  (``poll_checkpoint``) and wait for them at the end or on a signal (``finish_checkpoint``).
"""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Mapping

import torch
from lightning.pytorch.strategies import DDPStrategy

from ualm_nemo.distributed.checkpoint_check import find_resumable
from ualm_nemo.distributed.parallel import env_from_slurm, init_model_parallel
from ualm_nemo.model.config import ParallelConfig
from ualm_nemo.training import watchdog

_SKIP_KEYS = ("state_dict", "optimizer_states")


class MegatronStrategy(DDPStrategy):
    def __init__(self, parallel: ParallelConfig, seed: int, keep_last: int | None = None, async_save: bool = False,
                 **kwargs: Any) -> None:
        if not torch.cuda.is_available():
            from ualm_nemo.compat import cpu_shim

            cpu_shim.install()
        env_from_slurm()
        kwargs.setdefault("process_group_backend", "nccl" if torch.cuda.is_available() else "gloo")
        kwargs.setdefault("timeout", timedelta(minutes=30))
        super().__init__(**kwargs)
        self.parallel, self.seed, self.keep_last, self.async_save = parallel, seed, keep_last, async_save
        self.save_seconds, self.last_save_seconds = 0.0, None  # for perf/checkpoint_save_s (training/throughput.py)

    def setup_distributed(self) -> None:
        super().setup_distributed()
        init_model_parallel(self.parallel, self.seed)

    def configure_ddp(self) -> None:
        """No torch DDP: gradients are reduced by Megatron DDP inside the engine."""

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # the engine's optimizer must exist before its state is loaded

    def lightning_module_state_dict(self) -> dict[str, Any]:
        return {}  # weights live in the distributed checkpoint, never gathered on one rank

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        return {}

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        pass  # loaded by the engine in load_checkpoint

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        pass

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any = None) -> None:
        """Every rank writes its shards; ``filepath`` is the run's checkpoint folder."""
        module = self.lightning_module
        loop_state = {k: v for k, v in checkpoint.items() if k not in _SKIP_KEYS}
        start = time.perf_counter()
        with watchdog.section(f"the checkpoint save at step {module.engine.step}", "save"):
            module.engine.save(str(filepath), extra={"lightning": loop_state, **module.checkpoint_extra()},
                               keep_last=self.keep_last, async_save=self.async_save)
        # the step-time stall: the whole save when synchronous, the state-dict build and copies when asynchronous
        self.last_save_seconds = time.perf_counter() - start
        self.save_seconds += self.last_save_seconds

    def poll_checkpoint(self) -> None:
        """Publish an asynchronous save once every rank wrote it (collective; a no-op when none is pending)."""
        self.lightning_module.engine.poll_save()

    def finish_checkpoint(self) -> None:
        """Wait for the asynchronous save in flight and publish it (collective): at the end and on a signal."""
        engine = self.lightning_module.engine
        if engine.saver.pending is not None:
            with watchdog.section(f"the checkpoint write started before step {engine.step}", "save"):
                engine.finish_save()

    def load_checkpoint(self, checkpoint_path) -> dict[str, Any]:
        """``checkpoint_path``: a run's checkpoint folder (its latest save is used) or one ``iter_*`` folder."""
        path = Path(checkpoint_path)
        latest = find_resumable(path)  # a damaged latest: the newest complete one, with a warning
        module = self.lightning_module
        state = module.engine.load(str(latest or path))
        module.restore_extra(state)
        loop_state = dict(state.get("lightning") or {})
        loop_state.update(state_dict={}, optimizer_states=[{}])
        return loop_state

    def remove_checkpoint(self, filepath) -> None:
        pass  # rotation is the engine's keep-last policy
