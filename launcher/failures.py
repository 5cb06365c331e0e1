"""How often to checkpoint: the interval that loses the least time to saves and failures (Young/Daly).

A run on G GPUs that fail independently at ``rate`` per GPU-day sees one interruption every
MTBF = 1 day / (rate x G). Checkpointing every tau seconds of training costs S / tau of the time in saves (S: the
step-time stall of one save); each failure costs the restart R plus, on average, half an interval of recomputed
work. The waste S / tau + tau / (2 MTBF) is least at tau* = sqrt(2 S MTBF) (Young 1974; Daly 2006 refines it for
S not small against MTBF). The default rate is Llama 3's: 419 unexpected interruptions in 54 days on 16,384 GPUs
= 4.7e-4 per GPU-day (the Llama 3 paper, Dubey et al. 2024, its reliability section).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

DAY = 86400.0
LLAMA3_FAILURES_PER_GPU_DAY = 419 / (54 * 16384)  # 4.74e-4
FAR = 3.0  # a configured interval this many times off the optimum (either way) gets a warning


def checkpoint_bytes(total_params: int, trainable_params: int, params_dtype: str) -> float:
    """Bytes of one checkpoint: every weight in its dtype (frozen ones too) plus the optimizer state of the
    trainable ones (bf16: fp32 master + Adam m, v = 12 bytes; fp32: m, v = 8), as the engine's distributed
    checkpoint stores them (the grad buffer is not saved)."""
    weight = 2 if params_dtype == "bf16" else 4
    return float(weight * total_params + (12 if params_dtype == "bf16" else 8) * trainable_params)


def mtbf_seconds(failures_per_gpu_day: float, gpus: int) -> float:
    """Mean time between interruptions of the whole job: one failing GPU (or its node) stops every rank."""
    return DAY / (failures_per_gpu_day * gpus)


def young_daly_interval(save_s: float, mtbf_s: float) -> float:
    """Seconds of training between checkpoints that minimise the expected lost time: sqrt(2 S MTBF)."""
    return math.sqrt(2.0 * save_s * mtbf_s)


def goodput(interval_s: float, save_s: float, restart_s: float, mtbf_s: float) -> float:
    """Expected fraction of wall time that advances training, first order in 1 / MTBF:
    tau / (tau + S) of the time between failures trains, and each failure (one per MTBF) loses R + (tau + S) / 2."""
    lost_per_failure = restart_s + (interval_s + save_s) / 2.0
    return interval_s / (interval_s + save_s) * max(0.0, 1.0 - lost_per_failure / mtbf_s)


@dataclass(frozen=True)
class FailurePlan:
    """The figures launcher.plan prints (all seconds unless named otherwise)."""

    save_s: float
    save_from: str  # "measured (--save-seconds)" or how it was estimated
    checkpoint_bytes: float
    restart_s: float
    failures_per_gpu_day: float
    mtbf_s: float
    expected_failures: float  # over train.max_steps
    optimum_s: float
    optimum_steps: int
    goodput_optimum: float
    configured_steps: int
    configured_s: float
    goodput_configured: float
    warning: str | None


def plan_failures(*, gpus: int, step_s: float, max_steps: int, every_n_steps: int, ckpt_bytes: float,
                  nodes: int, write_gbps: float, save_s: float | None, restart_s: float,
                  failures_per_gpu_day: float) -> dict[str, Any]:
    """Young/Daly for this run: ``save_s`` if measured, else ``ckpt_bytes`` written at ``write_gbps`` GB/s per
    node (every rank writes its own shards, so nodes write in parallel until the file system saturates)."""
    save_from = "measured (--save-seconds)"
    if save_s is None:
        save_s = ckpt_bytes / (write_gbps * 1e9 * nodes)
        save_from = f"{ckpt_bytes / 1e9:.1f} GB at {write_gbps:g} GB/s per node x {nodes} node(s) (--write-gbps)"
    mtbf = mtbf_seconds(failures_per_gpu_day, gpus)
    optimum = young_daly_interval(save_s, mtbf)
    optimum_steps = max(1, round(optimum / step_s))
    configured = every_n_steps * step_s
    warning = None
    if not optimum / FAR <= configured <= optimum * FAR:
        warning = (f"train.checkpoint_every_n_steps={every_n_steps} ({_hours(configured)}) is "
                   f"{max(configured / optimum, optimum / configured):.0f}x {'above' if configured > optimum else 'below'}"
                   f" the optimum {optimum_steps} steps ({_hours(optimum)}): set "
                   f"train.checkpoint_every_n_steps={optimum_steps}")
    return asdict(FailurePlan(
        save_s=save_s, save_from=save_from, checkpoint_bytes=ckpt_bytes, restart_s=restart_s,
        failures_per_gpu_day=failures_per_gpu_day, mtbf_s=mtbf, expected_failures=step_s * max_steps / mtbf,
        optimum_s=optimum, optimum_steps=optimum_steps,
        goodput_optimum=goodput(optimum_steps * step_s, save_s, restart_s, mtbf),
        configured_steps=every_n_steps, configured_s=configured,
        goodput_configured=goodput(configured, save_s, restart_s, mtbf), warning=warning))


def render_failures(f: dict[str, Any]) -> list[str]:
    """The plan's text lines for the failure figures."""
    lines = [f"failures: {f['failures_per_gpu_day']:.2e} per GPU-day (--failures-per-gpu-day) -> one interruption "
             f"every {_hours(f['mtbf_s'])} for this job (MTBF), {f['expected_failures']:.1f} expected over "
             "train.max_steps",
             f"checkpoint: {f['checkpoint_bytes'] / 1e9:.1f} GB, save {f['save_s']:.1f} s ({f['save_from']}); "
             f"restart {f['restart_s']:.0f} s (--restart-seconds)",
             f"Young/Daly interval sqrt(2 x save x MTBF) = {_hours(f['optimum_s'])} = every "
             f"{f['optimum_steps']:,} steps: goodput {f['goodput_optimum']:.2%}",
             f"configured train.checkpoint_every_n_steps={f['configured_steps']:,} ({_hours(f['configured_s'])}): "
             f"goodput {f['goodput_configured']:.2%}"]
    if f["warning"]:
        lines.append(f"WARNING: {f['warning']}")
    return lines


def _hours(s: float) -> str:
    return f"{s / DAY:,.1f} days" if s >= 2 * DAY else f"{s / 3600:.1f} h" if s >= 7200 else f"{s / 60:.1f} min"
