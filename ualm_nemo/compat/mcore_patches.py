"""Fixes for megatron-core 0.16.1's DistributedOptimizer (checkpoints, one speed patch).

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
   write from threads of the trainer (synchronous, or asynchronous from distributed/async_save.py's writer
   thread), so those results never leave the process: a thread-safe in-process queue
   carries them the same way, and no server is started.
5. ``in_process_writers``: every synchronous ``dist_checkpointing.save`` forks one writer process per file
   bucket (``FileSystemWriterAsync.write_preloaded_data_multiproc``, two per rank). A trainer killed while they
   write leaves them hanging forever (adopted by PID 1) in ``count_queue.task_done()``: a multiprocessing
   Condition's notify waits for the dead parent to wake. The buckets are written by threads of the trainer
   itself instead (the same ``write_preloaded_data``, the same files), so a save starts no process at all.
6. ``single_rank_collectives`` (speed, not a bug): with one data-parallel rank the distributed optimizer's grad
   reduce-scatter and param all-gather still run, each over the whole buffer, input and output the same memory;
   gloo copies it (and clones it) anyway: ~0.2 s a step at 24M parameters on a 2-core CPU. Over a group of one
   rank both are the identity, so they are skipped (a copy is made only if input and output differ). The
   optimizer, its state and the checkpoint format are untouched; results are bit-identical.
7. The sharding format (``fully_reshardable``, the only one that reshards across TP) is passed as checkpoint
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


def _fix_in_process_writers() -> None:
    import inspect
    import queue
    import threading

    from megatron.core.dist_checkpointing.strategies.async_utils import _disable_gc
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    write_bucket = FileSystemWriterAsync.write_preloaded_data  # one bucket -> one file; runs anywhere
    takes_msc = len(inspect.signature(write_bucket).parameters) > 6  # upstream's own test for the keyword

    @_disable_gc()  # as upstream: no collection while the buckets' tensors are being written
    def write_in_threads(transform_list, use_msc, rank, write_buckets, global_results_queue) -> None:
        """``write_preloaded_data_multiproc`` with threads for processes; the same results or exception."""
        results, count = queue.Queue(), queue.Queue()  # what the upstream worker expects of its two queues
        threads = []
        for i, bucket in enumerate(write_buckets):
            count.put(i)
            kwargs = {"local_proc_idx": i, "write_bucket": bucket, "results_queue": results, "count_queue": count,
                      "use_fsync": True, **({"use_msc": use_msc} if use_msc and takes_msc else {})}
            threads.append(threading.Thread(target=write_bucket, args=(transform_list,), kwargs=kwargs,
                                            name=f"ckpt-writer-{i}", daemon=True))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out: dict | Exception = {}
        while not results.empty():
            index, written = results.get()
            if isinstance(written, Exception):  # write_preloaded_data caught it: the save fails with it
                out = written
                break
            out[index] = written
        if isinstance(out, dict) and len(out) != len(write_buckets):
            out = RuntimeError(f"checkpoint writers returned {len(out)} of {len(write_buckets)} results")
        global_results_queue.put(out)

    FileSystemWriterAsync.write_preloaded_data_multiproc = staticmethod(write_in_threads)


def _fix_single_rank_collectives() -> None:
    from megatron.core.distributed import param_and_grad_buffer as buffers

    gather, scatter = buffers.dist_all_gather_func, buffers.dist_reduce_scatter_func

    def identity_on_one_rank(collective):
        def call(output, input_, *args, group=None, async_op=False, **kwargs):
            if torch.distributed.get_world_size(group) > 1:
                return collective(output, input_, *args, group=group, async_op=async_op, **kwargs)
            if output.data_ptr() != input_.data_ptr() or output.shape != input_.shape:
                output.copy_(input_.view_as(output))
            return None  # megatron's _coalescing_manager then has no work to wait for, sync or async

        return call

    buffers.dist_all_gather_func = identity_on_one_rank(gather)
    buffers.dist_reduce_scatter_func = identity_on_one_rank(scatter)


FIXES = {"fresh_step": _fix_fresh_step, "shared_step": _fix_shared_step, "fresh_state": _fix_fresh_state,
         "in_process_results": _fix_in_process_results, "in_process_writers": _fix_in_process_writers,
         "single_rank_collectives": _fix_single_rank_collectives}


def apply(names: tuple[str, ...] = tuple(FIXES)) -> None:
    for name in names:
        if name not in _APPLIED:
            FIXES[name]()
            _APPLIED.add(name)
