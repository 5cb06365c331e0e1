"""The generated sbatch script, run by bash against stand-in srun/scontrol/sbatch: quoting of hostile strings, the
torch.distributed environment, and the requeue/chain decision after srun. No Slurm needed (fast)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.cluster import ClusterConfig
from launcher.sbatch import directive_value, local_command, render, script_name
from launcher.validate import hydra_value
from ualm_nemo.model.config import ConfigError

HOSTILE = "x y; $(touch {pwned}) `touch {pwned}` \"dq\" 'sq' #c \\b * ~ & | > < !"

# srun stand-in: records its argv and environment, writes the run state the test asks for
_SRUN = """#!/usr/bin/env python3
import json, os, sys
from pathlib import Path
Path(os.environ["T_RECORD"]).write_text(json.dumps({"argv": sys.argv[1:], "env": dict(os.environ)}))
with open(os.environ["T_CALLS"], "a") as calls:
    calls.write("srun\\n")
latest = os.environ.get("T_LATEST_AFTER")  # a checkpoint this attempt wrote
if latest:
    Path(os.environ["T_OUT"], "checkpoints").mkdir(parents=True, exist_ok=True)
    Path(os.environ["T_OUT"], "checkpoints", "latest").write_text(latest)
state = os.environ.get("T_STATE")
if state:
    Path(os.environ["T_OUT"]).mkdir(parents=True, exist_ok=True)
    Path(os.environ["T_OUT"], "run_state").write_text(f"state={state}\\nstep=7\\nmax_steps=10\\n")
sys.exit(int(os.environ.get("T_RC", "0")))
"""
_LOGGER = """#!/bin/sh
echo "$0 $*" >> "$T_CALLS"
[ "$(basename "$0")" = sbatch ] && echo 99
[ "$1" = show ] && echo node-a && echo node-b
exit 0
"""


@pytest.fixture()
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(_SRUN)
    for name in ("scontrol", "sbatch"):
        (bin_dir / name).write_text(_LOGGER)
    for path in bin_dir.iterdir():
        path.chmod(0o755)
    return bin_dir


def _run(script: str, tmp_path: Path, bin_dir: Path, out: Path, **env) -> tuple[int, dict, list[str], str]:
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    record, calls = tmp_path / "record.json", tmp_path / "calls.txt"
    base = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "T_RECORD": str(record), "T_CALLS": str(calls),
            "T_OUT": str(out), "SLURM_JOB_ID": "1234", "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_NTASKS": "4"}
    base["UALM_RESTART_DELAY_S"] = "0"
    result = subprocess.run(["bash", str(path)], env={**base, **env}, capture_output=True, text=True, timeout=60)
    srun = json.loads(record.read_text()) if record.exists() else {}
    return result.returncode, srun, calls.read_text().splitlines() if calls.exists() else [], result.stdout + result.stderr


def _cluster(tmp_path: Path, **kw) -> ClusterConfig:
    return ClusterConfig(job_name=kw.pop("job_name", "t"), gpus_per_node=0, tasks_per_node=2, time="10",
                         signal_seconds=30, python=sys.executable, workdir=str(tmp_path), **kw).validate()


def test_hostile_strings_reach_srun_verbatim_and_nothing_runs(tmp_path, fake_slurm):
    pwned = tmp_path / "pwned"
    hostile = HOSTILE.format(pwned=pwned)
    out = tmp_path / "out dir 'q' $(touch x)"
    out.mkdir()
    cluster = _cluster(tmp_path, job_name=hostile, env={"HOSTILE": hostile, "EMPTY": ""},
                       container_image="nvcr.io/x:1 $(touch pwned)", container_mounts=[f"{out}:{out}"])
    overrides = [f"train.note={hostile}", hydra_value("output_dir", str(out))]
    script = render(cluster, str(out), overrides, str(out / "slurm" / "job.sbatch"), header=hostile)
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    rc, srun, calls, out_text = _run(script, tmp_path, fake_slurm, out, T_STATE="finished")
    assert rc == 0 and calls == [f"{fake_slurm}/scontrol show hostnames node-[a-b]", "srun"], out_text
    assert srun["argv"][-len(overrides):] == overrides  # byte for byte, nothing expanded or split
    assert srun["argv"][srun["argv"].index(sys.executable) + 1] == "examples/train.py"
    assert f"--container-image={cluster.container_image}" in srun["argv"]
    assert srun["env"]["HOSTILE"] == hostile and srun["env"]["EMPTY"] == ""
    assert srun["env"]["MASTER_ADDR"] == "node-a"  # the first host of the allocation
    assert srun["env"]["MASTER_PORT"] == str(20000 + 1234)
    assert not pwned.exists() and not (tmp_path / "x").exists() and not Path("pwned").exists()


@pytest.mark.parametrize("mode", ["requeue", "chain"])
def test_preempted_run_requeues_or_chains(tmp_path, fake_slurm, mode):
    out = tmp_path / "out"
    cluster = _cluster(tmp_path, mode=mode)
    script = render(cluster, str(out), [], str(out / "slurm" / "job.sbatch"))
    rc, _, calls, stdout = _run(script, tmp_path, fake_slurm, out, T_STATE="preempted")
    assert rc == 0, stdout
    if mode == "requeue":
        assert calls[-1] == f"{fake_slurm}/scontrol requeue 1234"
    else:
        assert calls[-1] == (f"{fake_slurm}/sbatch --parsable --dependency=afterany:1234 "
                             f"--export=ALL,UALM_CHAIN_INDEX=1 {out}/slurm/job.sbatch")
        assert "chained job 99" in stdout


@pytest.mark.parametrize("state,rc,expected_rc", [("finished", 0, 0), ("stopped", 0, 0), ("failed", 1, 1),
                                                  ("failed", 0, 1)])
def test_finished_or_failed_runs_start_no_new_job(tmp_path, fake_slurm, state, rc, expected_rc):
    """finished / stopped / failed (an error a restart would repeat): srun once, nothing requeued or restarted."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "run_state").write_text("state=preempted\n")  # a stale state of an earlier job must be ignored
    script = render(_cluster(tmp_path), str(out), [], str(out / "job.sbatch"))
    got, _, calls, _ = _run(script, tmp_path, fake_slurm, out, T_STATE=state, T_RC=str(rc))
    assert got == expected_rc
    assert calls.count("srun") == 1 and not any("requeue" in c or "sbatch" in c for c in calls)


@pytest.mark.parametrize("rc", [137, 75, 1, 0])
def test_crash_restarts_in_the_allocation_up_to_max_failures(tmp_path, fake_slurm, rc):
    """No run state (a rank killed: 137, the hang watchdog: 75, an exception: 1, or none at all): srun again with a
    new port, max_failures times, then state=failed with the reason and the job's exit status; never requeued."""
    out = tmp_path / "out"
    script = render(_cluster(tmp_path, max_failures=2), str(out), [], str(out / "job.sbatch"))
    got, _, calls, stdout = _run(script, tmp_path, fake_slurm, out, T_RC=str(rc))
    assert got == (rc or 1)
    assert calls.count("srun") == 3 and not any("requeue" in c or "sbatch" in c for c in calls)
    assert "restart 1/2 in this allocation" in stdout and "restart 2/2 in this allocation" in stdout
    ports = re.findall(r"master node-a:(\d+)", stdout)
    assert len(set(ports)) == 3  # every attempt its own rendezvous port
    state = (out / "run_state").read_text()
    assert "state=failed" in state and "reason=2 restarts after failures since checkpoint none" in state


def test_failures_count_only_without_progress(tmp_path, fake_slurm):
    """A crash after a new checkpoint starts the count again: a month-long run survives many spaced failures."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "failure_count").write_text("1 iter_0000004\n")  # one failure earlier, at checkpoint 4
    script = render(_cluster(tmp_path, max_failures=1), str(out), [], str(out / "job.sbatch"))
    got, _, calls, stdout = _run(script, tmp_path, fake_slurm, out, T_RC="137", T_LATEST_AFTER="iter_0000006")
    # attempt 0 reached checkpoint 6: the count restarts (1/1); attempt 1 made no new checkpoint: give up
    assert "restart 1/1 in this allocation from iter_0000006" in stdout
    assert got == 137 and calls.count("srun") == 2
    assert (out / "failure_count").read_text().split() == ["2", "iter_0000006"]


def test_restart_guard(tmp_path, fake_slurm):
    out = tmp_path / "out"
    script = render(_cluster(tmp_path, max_restarts=3), str(out), [], str(out / "job.sbatch"))
    rc, _, calls, _ = _run(script, tmp_path, fake_slurm, out, T_STATE="preempted", SLURM_RESTART_COUNT="3")
    assert rc == 1 and not any("requeue" in c for c in calls)
    rc, _, calls, _ = _run(script, tmp_path, fake_slurm, out, T_STATE="preempted", SLURM_RESTART_COUNT="2")
    assert rc == 0 and "requeue" in calls[-1]


def test_directives():
    script = render(ClusterConfig(job_name="a b", nodes=2, gpus_per_node=8, partition="batch", account="acc",
                                  time="2-00:00:00", sbatch_args=["--exclusive", "--qos=high prio"]).validate(),
                    "/r", ["x=1"], "/r/slurm/s.sbatch")
    lines = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert lines == ['#SBATCH --job-name="a b"', "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8",
                     "#SBATCH --gpus-per-node=8", "#SBATCH --partition=batch", "#SBATCH --account=acc",
                     "#SBATCH --time=2-00:00:00", "#SBATCH --signal=USR1@120", "#SBATCH --requeue",
                     "#SBATCH --open-mode=append", "#SBATCH --output=/r/slurm/%j.log", "#SBATCH --exclusive",
                     '#SBATCH --qos="high prio"']
    assert directive_value('a"b\\c') == '"a\\"b\\\\c"'
    with pytest.raises(ConfigError, match="one line"):
        directive_value("a\nb")


def test_local_command_and_script_name():
    one = ClusterConfig(gpus_per_node=1, python="py")
    assert local_command(one, ["a=1"]) == ["py", "examples/train.py", "a=1"]
    assert local_command(ClusterConfig(gpus_per_node=4, python="py"), [])[:5] == [
        "py", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]
    assert script_name("../a b;$(x)", "T") == "_a_b___x__T.sbatch"
    assert shlex.split(shlex.quote(HOSTILE)) == [HOSTILE]
