"""On a real single-node Slurm (started here when absent, stopped only if this session started it): a tiny stage
with 2 tasks submitted by `launcher.submit` (the paper's Shar blend, data=pretrain_blend, for the requeue case)
trains, is signalled (SIGUSR1, what --signal=USR1@N delivers), saves,
requeues (or chains a dependent job), resumes from its checkpoint and ends at max_steps; a run whose losses are
non-finite stops with a clear message, state=failed and its reason, and is neither restarted nor requeued. Job
names and paths are hostile on purpose."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from launcher.submit import main as submit
from ualm_nemo.distributed.checkpoint import find_latest
from ualm_nemo.testing.slurm_jobs import FINAL_STATES, job_log, wait_for
from ualm_nemo.training.preemption import read_run_state

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MAX_STEPS = 20
TINY = [f"train.max_steps={MAX_STEPS}", "optim.warmup_steps=2", "train.checkpoint_every_n_steps=1000",
        "train.global_batch_size=4",
        "train.micro_batch_size=2", "train.log_every_n_steps=1", "+data.synthetic_samples_per_task=4"]
HOSTILE_NAME = "ualm t \"q\" 'r' $(touch pwned); #x"


def shar_blend(demo_shar: dict[str, str]) -> list[str]:
    """data=pretrain_blend (understanding / generation / text) over the demo set's Shar sources, packed rows."""
    dirs = (demo_shar["understanding"], demo_shar["tta"], demo_shar["text"])
    return [*TINY[:-1], "data=pretrain_blend", "data.tokenizer=byte", "data.shar.max_tokens=512",
            "data.shar.seq_len=256", "data.shar.window_size=8", "data.shar.num_workers=0",
            *(f"data.shar.sources.{i}.shar_dir={d}" for i, d in enumerate(dirs))]


def _job(field: str, job_id: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    match = re.search(rf"\b{field}=(\S*)", out)
    return match.group(1) if match else ""


def _submit(tmp_path: Path, capsys, *flags: str, overrides=TINY) -> tuple[str, Path]:
    out = tmp_path / "run dir 'q' $(touch pwned)"
    assert submit(["--cluster", "local", "--job-name", HOSTILE_NAME, "--output-dir", str(out), *flags, "--",
                   *overrides]) == 0
    job_id = re.search(r"submitted job (\d+)", capsys.readouterr().out).group(1)
    return job_id, out


def _signal_when_training(out: Path, job_id: str, tasks: int = 2) -> None:
    """Signal once every task logged its first training line: a task still starting handles the signal by the
    start-up path instead (tested in test_early_signals.py), which would make this test's outcome a race."""
    wait_for(lambda: job_log(out, job_id).count("training from step 0") >= tasks, 120,
              f"all {tasks} tasks of job {job_id} to start training")
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True)  # to the job's tasks, as --signal=USR1@N


def _done(job_id: str) -> str:
    state = _job("JobState", job_id)
    return state if state in FINAL_STATES else ""


def _assert_resumed_and_finished(log: str, out: Path) -> None:
    saved = re.search(r"SIGUSR1 received: saving a checkpoint at step (\d+)", log)
    assert saved, log[-3000:]
    step = int(saved.group(1))
    assert 0 < step < MAX_STEPS
    assert f"resuming from {out}/checkpoints/iter_{step:07d}" in log  # the next job loads that checkpoint
    assert f"training from step {step} to max_steps={MAX_STEPS}" in log  # and continues from its step
    assert f"run state at step {MAX_STEPS}/{MAX_STEPS}: finished" in log
    assert read_run_state(out) == {"state": "finished", "step": str(MAX_STEPS), "max_steps": str(MAX_STEPS)}
    assert find_latest(out / "checkpoints").name == f"iter_{MAX_STEPS:07d}"
    assert not list(Path.cwd().glob("pwned")) and not list(out.parent.glob("pwned"))


def test_signal_checkpoint_requeue_resume_to_max_steps(slurm, tmp_path, capsys, demo_shar):
    job_id, out = _submit(tmp_path, capsys, overrides=shar_blend(demo_shar))
    name = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%j"], capture_output=True, text=True).stdout
    assert name.rstrip("\n") == HOSTILE_NAME  # through the #SBATCH parser verbatim
    _signal_when_training(out, job_id)
    # requeued jobs wait AuthInfo=cred_expire seconds (10 here, 120 by default) before they may start again
    assert wait_for(lambda: _done(job_id), 420, f"job {job_id} to finish", poll=1) == "COMPLETED", \
        job_log(out, job_id)
    log = job_log(out, job_id)
    assert _job("Restarts", job_id) == "1"
    assert f"[launcher] requeueing job {job_id}" in log and f"[launcher] job {job_id} restart 1" in log
    _assert_resumed_and_finished(log, out)
    assert "Shar blend of 3 source(s) (weighting=size, pack=True): understanding [understanding]" in log
    assert log.rstrip().endswith("[launcher] max_steps reached: no further job")


def test_signal_checkpoint_chain_resume_to_max_steps(slurm, tmp_path, capsys):
    first, out = _submit(tmp_path, capsys, "--mode", "chain")
    _signal_when_training(out, first)
    assert wait_for(lambda: _done(first), 120, f"job {first} to finish", poll=0.5) == "COMPLETED"
    second = re.search(r"\[launcher\] chained job (\d+)", job_log(out, first)).group(1)
    assert _job("Dependency", second) in (f"afterany:{first}(unfulfilled)", f"afterany:{first}", "(null)")
    assert wait_for(lambda: _done(second), 180, f"job {second} to finish", poll=0.5) == "COMPLETED"
    _assert_resumed_and_finished(job_log(out, first) + job_log(out, second), out)
    assert "no further job" in job_log(out, second)


def test_nonfinite_losses_stop_the_run_without_requeue(slurm, tmp_path, capsys):
    """A NaN injected into every step's loss (through sitecustomize in the job's PYTHONPATH)."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "import torch\n"
        "from ualm_nemo.training import engine\n"
        "_step = engine.MegatronEngine.train_step\n"
        "def train_step(self, microbatches):\n"
        "    for mb in microbatches:\n"
        "        mb.loss_weights = torch.full_like(mb.loss_weights, float('nan'))\n"
        "    return _step(self, microbatches)\n"
        "engine.MegatronEngine.train_step = train_step\n")
    repo = Path(__file__).resolve().parents[2]  # this checkout's code, not whatever the editable install names
    job_id, out = _submit(tmp_path, capsys, "--env", f"PYTHONPATH={inject}:{repo}",
                          overrides=[*TINY, "train.max_consecutive_nonfinite=3"])
    assert wait_for(lambda: _done(job_id), 180, f"job {job_id} to finish", poll=0.5) == "FAILED"
    log = job_log(out, job_id)
    assert "NonFiniteLossError: 3 non-finite losses in a row" in log and "train.max_consecutive_nonfinite" in log
    assert "[launcher] training failed: NonFiniteLossError: 3 non-finite losses in a row" in log
    assert "not restarted (it would fail the same way)" in log and "[launcher] requeueing" not in log
    assert log.count("attempt 0") == 1 and "attempt 1" not in log  # the same job's srun ran once
    state = read_run_state(out)
    assert _job("Restarts", job_id) == "0" and state["state"] == "failed"
    assert state["reason"].startswith("NonFiniteLossError: 3 non-finite losses in a row")
