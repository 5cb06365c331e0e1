"""Fixes for megatron-core 0.16.1's DistributedOptimizer checkpoints (measured: ../shared/notes/megatron-cpu.md).

Each fix is one function, applied once by ``apply()``, and each has a test (tests/distributed) that fails if
upstream behaviour changes under it:

1. ``fresh_step``: a fresh torch Adam has no ``step`` in its per-parameter state, and loading a saved state
   whose per-parameter tensors lack ``step`` raises ``KeyError: 'step'`` in
   ``_set_main_param_and_optimizer_states``: pop ``step`` around the call and put it back.
2. ``shared_step``: ``load_state_dict`` gives every parameter ONE shared ``step`` tensor, which torch Adam then
   increments once per parameter per step: the resumed run silently diverges. Clone ``step`` per parameter.
3. ``fresh_state``: ``state_dict()`` of a fresh optimizer (no step taken; the state a resume loads into)
   asserts one ``step`` value across parameters and finds none. Give each parameter the state torch Adam
   would create on its first step (zero moments, ``step`` 0): identical behaviour, and loading works.
4. ``in_process_results``: the first ``dist_checkpointing.save`` creates a ``multiprocessing`` Manager from a
   *spawn* context just to carry the writer's results back (a server process that re-imports the entry script,
   about 0.8 GB; it and its resource tracker outlive a ``kill -9`` of the trainer, adopted by PID 1). Our saves
   are synchronous (no async save), so those results never leave the process: a thread-safe in-process queue
   carries them the same way, and no server is started.
5. The sharding format (``fully_reshardable``, the only one that reshards across TP) is passed as checkpoint
   metadata by ``distributed/checkpoint.py``, not patched.
"""

from __future__ import annotations

import torch

_APPLIED: set[str] = set()


def _fix_fresh_step() -> None:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def patched(self, model_param, tensors):
        group_index, order = self.model_param_group_index_map[model_param]
        state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][order]]
        step = state.pop("step", None)
        try:
            original(self, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    DistributedOptimizer._set_main_param_and_optimizer_states = patched


def _fix_shared_step() -> None:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer.load_state_dict

    def patched(self, state_dict):
        original(self, state_dict)
        for state in self.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].detach().clone()

    DistributedOptimizer.load_state_dict = patched


def _fix_fresh_state() -> None:
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:  # TE/apex FusedAdam keep ``step`` in param_groups instead
        return
    original = distrib_optimizer.DistributedOptimizer.state_dict

    def patched(self):
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                state = self.optimizer.state[param]
                if "step" not in state:
                    state.setdefault("exp_avg", torch.zeros_like(param, memory_format=torch.preserve_format))
                    state.setdefault("exp_avg_sq", torch.zeros_like(param, memory_format=torch.preserve_format))
                    state["step"] = torch.tensor(0.0)
        return original(self)

    distrib_optimizer.DistributedOptimizer.state_dict = patched


def _fix_in_process_results() -> None:
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


FIXES = {"fresh_step": _fix_fresh_step, "shared_step": _fix_shared_step, "fresh_state": _fix_fresh_state,
         "in_process_results": _fix_in_process_results}


def apply(names: tuple[str, ...] = tuple(FIXES)) -> None:
    for name in names:
        if name not in _APPLIED:
            FIXES[name]()
            _APPLIED.add(name)
