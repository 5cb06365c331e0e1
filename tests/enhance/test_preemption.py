"""The enhancer under the launcher: a real process of examples/train_enhancer.py is signalled (SIGUSR1, what
Slurm's --signal=USR1@N delivers), saves, records state=preempted and exits 0; the rerun resumes from that step
and records finished. `launcher.submit --entry enhancer` validates conf/enhancer.yaml and writes the same batch
script (requeue on preempted) around the enhancer's entry."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.submit import main as submit
from ualm_nemo.testing.enhancer_clips import write_clips
from ualm_nemo.early_signals import read_run_state

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(300)


def overrides(data: Path, out: Path, max_steps: int) -> list[str]:
    return [f"train.data={data}", f"output_dir={out}", "model.preset=tiny", "loss.discriminator_filters=4",
            "loss.discriminator_ffts=[512,128]", "train.segment_seconds=0.08", "train.global_batch_size=1",
            f"train.max_steps={max_steps}", "train.num_workers=0", "train.checkpoint_every_n_steps=100000"]


def test_signal_saves_records_preempted_and_the_rerun_finishes(tmp_path):
    data, out = tmp_path / "clips", tmp_path / "run"
    write_clips(data, 1, 0.5)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(REPO / "examples" / "train_enhancer.py"), *overrides(data, out, 100000)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # Hydra logs to stdout  # wait until it trains, then signal as Slurm would
        lines.append(line)
        if "enhancer: training from step 0" in line:
            time.sleep(1.0)
            proc.send_signal(signal.SIGUSR1)
            break
    rest, _ = proc.communicate(timeout=120)
    log = "".join(lines) + rest
    assert proc.returncode == 0, log[-3000:]
    saved = re.search(r"SIGUSR1 received: saving a checkpoint at step (\d+)", log)
    assert saved, log[-3000:]
    step = int(saved.group(1))
    assert read_run_state(out) == {"state": "preempted", "step": str(step), "max_steps": "100000"}
    assert (out / "checkpoints" / "latest").read_text().strip() == f"iter_{step:07d}"

    rerun = subprocess.run([sys.executable, str(REPO / "examples" / "train_enhancer.py"),
                            *overrides(data, out, step + 3)], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"training from step {step} to max_steps={step + 3}" in rerun.stdout + rerun.stderr
    assert read_run_state(out)["state"] == "finished"


def test_submit_entry_enhancer_validates_and_writes_its_batch_script(tmp_path, capsys):
    data = tmp_path / "clips"
    write_clips(data, 1, 0.5)
    base = ["--cluster", "local", "--entry", "enhancer", "--output-dir", str(tmp_path / "run"), "--dry-run", "--"]
    assert submit([*base, f"train.data={data}", "model.preset=tiny", "train.global_batch_size=4"]) == 0
    script = capsys.readouterr().out
    assert "examples/train_enhancer.py" in script and "examples/train.py" not in script
    assert "scontrol requeue" in script and "run_state" in script
    assert submit([*base, "model.preset=tiny"]) == 2
    assert "train.data" in capsys.readouterr().err
    assert submit([*base, f"train.data={tmp_path / 'nowhere'}"]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    # every problem in one error
    assert submit([*base, f"train.data={tmp_path / 'nowhere'}", f"train.codec_round_trip={tmp_path / 'no_codec'}",
                   "train.global_batch_size=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 3 problems:") and "no_codec" in err and "divisible" in err, err
