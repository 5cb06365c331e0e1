"""Faults injected into real training processes, for the launcher's fault and chaos tests.

A test writes a plan (JSON list of ``{"kind", "step", "rank"}``) and puts a ``sitecustomize.py`` that calls
``install()`` on the job's PYTHONPATH (``write_injector``). Each fault fires once per run, in the process of that
global rank, when the engine has finished optimizer step ``step``:

* ``kill``: SIGKILL of the process (a rank that dies: OOM killer, a GPU off the bus);
* ``stop``: SIGSTOP of the process (a rank that hangs and never answers);
* ``raise``: a RuntimeError in that rank only (a crash that is not a preemption);
* ``kill_in_save``: SIGKILL right after this rank's ``dist_checkpointing.save`` of the step-``step`` checkpoint
  returns (its shards written, or with ``train.async_save`` their background write started), before the save is
  complete (an interrupted save).

Firing records ``fired_<index>.json`` (kind, step, rank, wall time) next to the plan, created exclusively, so a
restarted run does not fire the same fault again and the test can measure detection times.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

PLAN_ENV = "UALM_FAULT_PLAN"
KINDS = ("kill", "stop", "raise", "kill_in_save")


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def _claim(plan: Path, index: int, fault: dict) -> bool:
    """True once per fault over all restarts (the marker file is created exclusively)."""
    try:
        fd = os.open(plan.parent / f"fired_{index}.json", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump({**fault, "time": time.time(), "pid": os.getpid(), "host": os.uname().nodename}, f)
        f.flush()
        os.fsync(f.fileno())
    return True


def _fire(kind: str, step: int) -> None:
    print(f"[fault] rank {_rank()}: injecting {kind} at step {step}", flush=True)
    if kind in ("kill", "kill_in_save"):
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif kind == "raise":
        raise RuntimeError(f"injected fault in rank {_rank()} at step {step}")


def install() -> None:
    """Wrap the engine's step and the checkpoint writer when ``UALM_FAULT_PLAN`` names a plan."""
    if not os.environ.get(PLAN_ENV):
        return
    plan = Path(os.environ[PLAN_ENV])
    faults = json.loads(plan.read_text())
    for fault in faults:
        if fault["kind"] not in KINDS:
            raise ValueError(f"fault kind {fault['kind']!r}: choose one of {KINDS}")

    def due(kind_ok, step: int) -> None:
        for index, fault in enumerate(faults):
            if kind_ok(fault["kind"]) and fault["step"] == step and fault["rank"] == _rank():
                if _claim(plan, index, fault):
                    _fire(fault["kind"], step)

    from megatron.core import dist_checkpointing

    from ualm_nemo.training import engine

    step_fn = engine.MegatronEngine.train_step

    def train_step(self, microbatches):
        result = step_fn(self, microbatches)
        due(lambda k: k != "kill_in_save", self.step)
        return result

    engine.MegatronEngine.train_step = train_step
    save_fn = dist_checkpointing.save

    def save(sharded_state_dict, checkpoint_dir, *args, **kwargs):
        result = save_fn(sharded_state_dict, checkpoint_dir, *args, **kwargs)
        name = Path(str(checkpoint_dir)).name  # iter_0000008.tmp
        if name.startswith("iter_") and name.endswith(".tmp"):
            due(lambda k: k == "kill_in_save", int(name[5:12]))
        return result

    dist_checkpointing.save = save


def write_injector(folder: Path, plan: list[dict]) -> Path:
    """``folder``/plan.json and ``folder``/sitecustomize.py; put ``folder`` first on the job's PYTHONPATH."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plan.json").write_text(json.dumps(plan))
    (folder / "sitecustomize.py").write_text("from ualm_nemo.testing import faults\nfaults.install()\n")
    return folder / "plan.json"


def fired(folder: Path) -> list[dict]:
    """The faults that fired, in plan order."""
    return [json.loads(p.read_text()) for p in sorted(folder.glob("fired_*.json"),
                                                        key=lambda p: int(p.stem.split("_")[1]))]
