"""Lets megatron-core's local (non-TE) path run on a CPU-only torch; a no-op when CUDA exists.

megatron-core 0.16.1 calls ``torch.cuda.current_device()`` at ~175 sites and feeds it to ``device=``, keeps its
RNG tracker in CUDA generators, and hard-codes ``device="cuda"`` / ``Tensor.type()`` checks in the optimizer and
schedules. ``install()`` points those at the CPU:

1. torch.cuda stand-ins: current_device -> cpu, synchronize/streams/events/nvtx -> no-ops, RNG state -> the CPU
   generator (also megatron's private ``_get/_set_cuda_rng_state``).
2. A TorchFunctionMode that maps ``device="cuda"``, ``.cuda()`` and ``.to("cuda")`` to the CPU and makes
   ``Tensor.type()`` report ``torch.cuda.*`` names (optimizer and clip_grads assert on them).
3. Sequence parallel with torch norms: megatron's WrappedTorchNorm refuses SP; build the norm anyway and mark its
   parameters ``sequence_parallel`` so their grads are all-reduced over TP like TE/apex norms.

Everything is process-global by nature (it patches ``torch.cuda``); call ``install()`` once at start-up, before
megatron builds anything. Used only for tests, the CPU demo and CI: production runs on GPUs never install it.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch.overrides import TorchFunctionMode

_STATE = {"installed": False}
_MODE_BY_THREAD = threading.local()


class _NullStream:
    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, *args, **kwargs) -> None:
        pass

    def wait_event(self, *args, **kwargs) -> None:
        pass

    def record_event(self, *args, **kwargs) -> "_NullEvent":
        return _NullEvent()

    def synchronize(self) -> None:
        pass

    def __enter__(self) -> "_NullStream":
        return self

    def __exit__(self, *exc) -> bool:
        return False


class _NullEvent:
    def __init__(self, *args, **kwargs) -> None:
        pass

    def record(self, *args, **kwargs) -> None:
        pass

    def wait(self, *args, **kwargs) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other) -> float:
        return 0.0


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)  # a bare index means cuda:<index>


class CpuDeviceMode(TorchFunctionMode):
    """Redirects CUDA device requests to the CPU and reports CUDA tensor type names."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            if name.startswith("torch.") and not name.startswith("torch.cuda."):
                name = "torch.cuda." + name[len("torch."):]
            return name
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu") + tuple(args[2:])
        return func(*args, **kwargs)


def ensure_device_mode() -> None:
    """Push the device mode on the calling thread (modes are per thread; call in worker threads too)."""
    if not _STATE["installed"] or getattr(_MODE_BY_THREAD, "mode", None) is not None:
        return
    mode = CpuDeviceMode()
    mode.__enter__()  # stays pushed for the life of the thread
    _MODE_BY_THREAD.mode = mode


def install() -> bool:
    """Install the shim if CUDA is absent. Returns True when it was installed by this call."""
    if _STATE["installed"] or torch.cuda.is_available():
        return False
    cuda = torch.cuda
    cuda.current_device = lambda: torch.device("cpu")
    cuda.synchronize = lambda *a, **k: None
    cuda.get_rng_state = lambda device=None: torch.get_rng_state()
    cuda.set_rng_state = lambda new_state, device=None: torch.set_rng_state(new_state)
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state
    cuda.current_stream = lambda *a, **k: _NullStream()
    cuda.default_stream = lambda *a, **k: _NullStream()
    cuda.Stream = _NullStream
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.Event = _NullEvent
    cuda.nvtx.range_push = lambda *a, **k: None
    cuda.nvtx.range_pop = lambda *a, **k: None

    import megatron.core.tensor_parallel.random as mcore_random

    # megatron's RNG tracker queues CUDA generator updates via torch.cuda._lazy_call (a silent no-op on CPU).
    mcore_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    _patch_checkpoint_backward(mcore_random.CheckpointFunction)
    _patch_torch_norm_for_sequence_parallel()
    _STATE["installed"] = True
    ensure_device_mode()
    return True


@contextlib.contextmanager
def device_mode_suspended():
    """Run a block without the device mode on this thread (benchmarks: a plain-torch reference step measured
    next to a Megatron step without paying for the mode's per-op dispatch)."""
    mode = getattr(_MODE_BY_THREAD, "mode", None)
    if mode is None:
        yield
        return
    mode.__exit__(None, None, None)
    try:
        yield
    finally:
        mode.__enter__()


def is_installed() -> bool:
    return _STATE["installed"]


def _patch_checkpoint_backward(function: type) -> None:
    """Activation recompute re-runs the forward inside the backward, where the device mode is off (torch pops a
    mode while its __torch_function__ runs the outer ``backward`` call): push one for the recompute."""
    backward = function.backward

    def with_device_mode(ctx, *grads):
        with CpuDeviceMode():
            return backward(ctx, *grads)

    function.backward = staticmethod(with_device_mode)


def _patch_torch_norm_for_sequence_parallel() -> None:
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    def __new__(cls, config, hidden_size, eps=1e-5, persist_layer_norm=False, zero_centered_gamma=False,
                normalization="LayerNorm"):
        norm_cls = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}[config.normalization]
        norm = norm_cls(normalized_shape=hidden_size, eps=eps)
        if config.sequence_parallel:
            for param in norm.parameters():
                param.sequence_parallel = True
        return norm

    WrappedTorchNorm.__new__ = __new__
