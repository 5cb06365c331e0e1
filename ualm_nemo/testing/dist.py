"""Run a function on W real processes over gloo (CPU) or NCCL (GPU): the harness of the parallel tests.

Each process initialises torch.distributed and Megatron's parallel_state for the given layout, runs ``fn`` and
sends its (picklable) result back. Process start costs ~5 s on CPU, so tests group their checks per launch.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from ualm_nemo.distributed.parallel import free_port


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple, results: str, timeout: int) -> None:
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
            context = mp.start_processes(_worker, args=(world, free_port(), fn, args, results, timeout),
                                         nprocs=world, join=False, start_method="spawn")
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


def _kill_leftovers(context) -> None:
    """Kill what the workers left running (e.g. a checkpoint writer's helper process after a worker died
    abruptly in a test): each worker leads its own process group."""
    for process in (context.processes if context is not None else []):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

