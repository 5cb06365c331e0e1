"""Process groups: torch.distributed from the launcher's environment, then Megatron's parallel_state.

gloo on CPU (with the CPU shim), NCCL on GPU. Works under torchrun, Slurm's srun (ranks from SLURM_* via the
launcher) and as a single plain process (world size 1 on a free loopback port).
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

from ualm_nemo.model.config import ParallelConfig


def free_port() -> int:
    """A free loopback TCP port (single-process runs, test harnesses)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_layout() -> tuple[int, int, int, int]:
    """(rank, world size, processes per node, nodes) from torchrun / Slurm / a single plain process, before any
    process group exists (what a Trainer or Fabric is built from)."""
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", str(world))))
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    return rank, world, per_node, max(world // per_node, 1)


def env_from_slurm() -> None:
    """Fill torch.distributed's env variables from SLURM_* when running under srun without torchrun."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")


def init_distributed() -> None:
    """Initialise the default process group once (idempotent)."""
    if dist.is_initialized():
        return
    if not torch.cuda.is_available():
        from ualm_nemo.compat import cpu_shim

        cpu_shim.install()
    env_from_slurm()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")


def init_model_parallel(parallel: ParallelConfig, seed: int) -> None:
    """Megatron parallel_state for (TP, PP, CP, virtual PP); the rest of the world is data parallel."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def comm_device() -> torch.device:
    """Where small tensors for collectives must live: NCCL needs the current GPU, gloo the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def teardown() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
