"""After ``kill -9`` of a real enhancer training run during a save, no process of it is left, the completed
checkpoint stays ``latest``, and the rerun resumes from it and clears the killed save's temporary file.

``examples/train_enhancer.py`` trains with 2 DataLoader workers and saves every step; a small wrapper runs the
real entry point and, at the second save, announces itself and waits after the checkpoint file is written under
its temporary name and before it is published, so the kill lands inside a save (the moment a half-published
checkpoint could be left). The kill is a real SIGKILL from outside, of the main process only."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from ualm_nemo.testing.enhancer_clips import write_clips
from ualm_nemo.testing.processes import MARKER_VAR, kill_marked, sigkill_leaves_nothing

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]

PAUSE_IN_SECOND_SAVE = """
import runpy, sys, time
from pathlib import Path

from ualm_nemo.enhance import checkpoints

out, publish = Path(sys.argv[1]), checkpoints.publish

def announcing(tmp, root, step, keep_last):
    if (root / "latest").exists():  # the second save: its file is written, not yet published
        (out / "in_save").write_text(str(step))
        time.sleep(30)  # the test kills the trainer meanwhile
    return publish(tmp, root, step, keep_last)

checkpoints.publish = announcing
sys.argv = ["examples/train_enhancer.py", *sys.argv[2:]]
runpy.run_path("examples/train_enhancer.py", run_name="__main__")
"""


def _overrides(data: Path, out: Path, max_steps: int, workers: int) -> list[str]:
    return [f"train.data={data}", f"output_dir={out}", "model.preset=tiny", "loss.discriminator_filters=4",
            "loss.discriminator_ffts=[512,128]", "train.segment_seconds=0.08", "train.global_batch_size=1",
            f"train.max_steps={max_steps}", f"train.num_workers={workers}", "train.checkpoint_every_n_steps=1"]


def test_nothing_of_a_killed_enhancer_run_is_left_and_it_resumes(tmp_path):
    data, out, marker = tmp_path / "clips", tmp_path / "run", uuid.uuid4().hex
    write_clips(data, 1, 0.5)
    env = {**os.environ, "OMP_NUM_THREADS": "1", MARKER_VAR: marker}
    log = (tmp_path / "train.log").open("w")
    proc = subprocess.Popen([sys.executable, "-c", PAUSE_IN_SECOND_SAVE, str(out), *_overrides(data, out, 100, 2)],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    root = out / "checkpoints"
    try:
        deadline = time.monotonic() + 240
        while not (out / "in_save").exists():
            assert proc.poll() is None, (tmp_path / "train.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the second save never started"
            time.sleep(0.1)
        first = (root / "latest").read_text().strip()
        assert first == "iter_0000001" and (root / "iter_0000002.ckpt.tmp").is_file()
        sigkill_leaves_nothing(proc, marker, min_children=2)  # the loader's 2 workers
        assert (root / "latest").read_text().strip() == first  # the killed save published nothing
        assert not (root / "iter_0000002.ckpt").exists()
    finally:
        log.close()
        kill_marked(marker)

    rerun = subprocess.run([sys.executable, "examples/train_enhancer.py", *_overrides(data, out, 3, 0)], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "training from step 1 to max_steps=3" in rerun.stdout + rerun.stderr
    assert (root / "latest").read_text().strip() == "iter_0000003"
    assert not list(root.glob("*.tmp*"))  # the killed save's file was cleared by the next publish
