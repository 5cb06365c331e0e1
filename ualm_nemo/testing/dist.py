"""Run a function on W real processes over gloo (CPU) or NCCL (GPU): the harness of the parallel tests.

Each process initialises torch.distributed and Megatron's parallel_state for the given layout, runs ``fn`` and
sends its (picklable) result back.

On a CPU the workers are forked from a forkserver that has imported torch, megatron-core, Lightning, NeMo and
transformers once (``PRELOAD``): a launch costs ~0.1 s instead of the ~6 s a spawned interpreter spends importing
them, and the suite launches hundreds. A forked worker is still a fresh process for everything that matters here
(no torch.distributed, no CPU shim, no parallel state: those start in the worker), and it takes the caller's
environment, working directory and sys.path as of the call (the forkserver's are those of its own start). With
CUDA the workers are spawned: CUDA must never be initialised before a fork.
"""

from __future__ import annotations

import faulthandler
import os
import pickle
import signal
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from ualm_nemo.distributed.parallel import free_port


PRELOAD = ["torch", "megatron.core", "lightning.pytorch", "nemo.core", "transformers",
           "ualm_nemo.training.engine", "ualm_nemo.training.train"]
_preload_set = False


def _worker(rank: int, world: int, port: int, call: bytes, caller: tuple[dict, str, list[str]], results: str,
            timeout: int) -> None:
    env, cwd, path = caller  # the caller's, as of this launch (see the module docstring)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    sys.path[:] = path
    os.setpgid(0, 0)  # own process group: whatever this worker starts is killed with it (see run_distributed)
    faulthandler.dump_traceback_later(timeout, exit=True)  # a hung collective fails the test, not CI
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1",
                      # what torchrun sets: Lightning detects its TorchElastic environment from these
                      TORCHELASTIC_RUN_ID="ualm-test", LOCAL_WORLD_SIZE=str(world), GROUP_RANK="0")
    torch.set_num_threads(1)
    from ualm_nemo.distributed.parallel import init_distributed, teardown

    init_distributed()
    out = Path(results) / f"rank{rank}.pt"
    try:
        fn, args = pickle.loads(call)  # only now: fn's module may live on the caller's sys.path only
        torch.save(("ok", fn(*args)), out)  # a file, not a pipe: any size, tensors included
    except BaseException:  # report every failure to the parent, then re-raise for the exit code
        torch.save(("error", traceback.format_exc()), out)
        raise
    finally:
        teardown()


def run_distributed(world: int, fn: Callable, *args: Any, timeout: int = 240) -> dict[int, Any]:
    """Run ``fn(*args)`` on ``world`` processes; returns {rank: result}. Raises with the first rank's traceback."""
    with tempfile.TemporaryDirectory(prefix="ualm_dist_") as results:
        context = None
        try:
            caller = (dict(os.environ), os.getcwd(), list(sys.path))
            context = mp.start_processes(_worker, args=(world, free_port(), pickle.dumps((fn, args)), caller,
                                                        results, timeout),
                                         nprocs=world, join=False, start_method=_start_method())
            while not context.join():
                pass
        except Exception as err:
            errors = []
            for rank in range(world):
                path = Path(results) / f"rank{rank}.pt"
                if path.exists():
                    status, payload = torch.load(path, weights_only=False)
                    if status == "error":
                        errors.append(f"--- rank {rank} ---\n{payload}")
            raise RuntimeError("distributed run failed:\n" + "\n".join(errors or [str(err)])) from err
        finally:
            _kill_leftovers(context)
        return {rank: torch.load(Path(results) / f"rank{rank}.pt", weights_only=False)[1] for rank in range(world)}


def _start_method() -> str:
    global _preload_set
    if torch.cuda.is_available() or os.environ.get("UALM_TEST_SPAWN") == "1":  # the escape hatch: UALM_TEST_SPAWN=1
        return "spawn"
    if not _preload_set:  # before the forkserver starts (at the first launch)
        mp.set_forkserver_preload(PRELOAD)
        _preload_set = True
    return "forkserver"


def _kill_leftovers(context) -> None:
    """Kill what the workers left running (e.g. a checkpoint writer's helper process after a worker died
    abruptly in a test): each worker leads its own process group."""
    for process in (context.processes if context is not None else []):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

