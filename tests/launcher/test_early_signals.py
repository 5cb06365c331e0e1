"""A Slurm signal that arrives while a task is still starting (imports, before training) requeues the job:
state=preempted and exit 0 at once, instead of Python's default for SIGUSR1/SIGTERM (die, no run_state, and
the batch script stops the chain). Real processes and real signals; only Slurm itself is absent here (the
batch script's reading of run_state is tested with a real Slurm in test_slurm.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ualm_nemo.early_signals import read_run_state

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture()
def out(tmp_path) -> Path:
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("iter_0000007")
    return tmp_path


def test_signal_before_arming_is_kept_then_requeues(out):
    run = _python("""
        import os, signal, sys
        from ualm_nemo import early_signals
        early_signals.install()
        os.kill(os.getpid(), signal.SIGUSR1)  # lands "during the imports": recorded, not fatal
        print("alive", flush=True)
        early_signals.arm(sys.argv[1], max_steps=10, rank=0)
        print("not reached", flush=True)
    """, out)
    assert run.returncode == 0 and "alive" in run.stdout and "not reached" not in run.stdout, run.stderr
    assert "SIGUSR1 received during start-up" in run.stderr
    assert read_run_state(out) == {"state": "preempted", "step": "7", "max_steps": "10"}


def test_signal_after_arming_requeues_at_once_and_every_rank_records_it(out):
    run = _python("""
        import os, signal, sys, time
        from ualm_nemo import early_signals
        early_signals.install()
        early_signals.arm(sys.argv[1], max_steps=10, rank=1)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
        print("not reached", flush=True)
    """, out)
    assert run.returncode == 0 and "not reached" not in run.stdout, run.stderr
    # rank 1 records it too: rank 0 may already be in its first step and die in a collective without writing
    assert read_run_state(out) == {"state": "preempted", "step": "7", "max_steps": "10"}


def test_signal_during_model_build_requeues_through_the_callback(out):
    """Between the callback's setup (its handlers installed) and the first step (model build, checkpoint load):
    still nothing trained, so the callback hands the signal on and the task requeues at once."""
    run = _python("""
        import os, signal, sys, time
        from ualm_nemo import early_signals
        from ualm_nemo.training.preemption import PreemptionCheckpoint
        early_signals.install()
        early_signals.arm(sys.argv[1], max_steps=10, rank=0)
        PreemptionCheckpoint(sys.argv[1]).setup(None, None, "fit")  # Lightning's setup hook, before the model
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
        print("not reached", flush=True)
    """, out)
    assert run.returncode == 0 and "not reached" not in run.stdout, run.stderr
    assert "SIGTERM received during start-up" in run.stderr
    assert read_run_state(out) == {"state": "preempted", "step": "7", "max_steps": "10"}


def test_once_training_starts_signals_are_the_callbacks(out):
    run = _python("""
        import os, signal, sys
        from ualm_nemo import early_signals
        early_signals.install()
        early_signals.arm(sys.argv[1], max_steps=10, rank=0)
        early_signals.disarm()  # what PreemptionCheckpoint.on_train_start does
        os.kill(os.getpid(), signal.SIGUSR1)
        print("still here", early_signals.received(), flush=True)
    """, out)
    assert run.returncode == 0 and f"still here [{int(signal.SIGUSR1)}]" in run.stdout, run.stderr
    assert read_run_state(out) == {}


def _catches(pid: int, signum: int) -> bool:
    """Whether the process has installed a handler for ``signum`` (SigCgt in /proc/<pid>/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(caught >> (signum - 1) & 1)


def test_train_entry_point_requeues_on_a_signal_during_its_imports(tmp_path):
    """examples/train.py gets SIGUSR1 as soon as its first line has installed the handler (torch, Lightning and
    megatron are still to be imported): it exits 0 with state=preempted, without building a model."""
    proc = subprocess.Popen([sys.executable, "examples/train.py", f"output_dir={tmp_path}", "train.max_steps=5",
                             "optim.warmup_steps=1"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not _catches(proc.pid, signal.SIGUSR1):
        assert proc.poll() is None and time.monotonic() < deadline, "train.py never installed its handler"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGUSR1)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert "SIGUSR1 received during start-up" in stderr
    assert read_run_state(tmp_path) == {"state": "preempted", "step": "0", "max_steps": "5"}
    assert not (tmp_path / "checkpoints").exists()  # nothing was built, nothing saved
