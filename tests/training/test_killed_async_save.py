"""``kill -9`` of a real training run while an asynchronous checkpoint is being written (issue 25, item 4).

``examples/train.py`` (train.async_save=true, the default) saves every 2 steps. A small wrapper runs the real
entry point and, once the first checkpoint is published, holds megatron's bucket writer (run by our writer thread)
for good and records each finished step: the test sees training go on past the held save, sees that ``latest``
still names the previous checkpoint, then kills the main process from outside. The save it was killed in
published nothing; the next start removes its partial folder and resumes from the previous checkpoint.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from ualm_nemo.testing.processes import MARKER_VAR, kill_marked, sigkill_leaves_nothing

pytestmark = [pytest.mark.timeout(400), pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]

HOLD_SECOND_SAVE = """
import runpy, sys, time
from pathlib import Path

from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
from ualm_nemo.training.engine import MegatronEngine

out, write_bucket, train_step = Path(sys.argv[1]), FileSystemWriterAsync.write_preloaded_data, MegatronEngine.train_step

def held(*args, **kwargs):  # the writer of every save after the first published one never finishes
    if (out / "checkpoints" / "latest").exists():
        (out / "writer.held").write_text("")
        while True:
            time.sleep(1)
    return write_bucket(*args, **kwargs)

def recorded(self, *args, **kwargs):
    result = train_step(self, *args, **kwargs)
    (out / f"step.{self.step}").write_text("")
    return result

FileSystemWriterAsync.write_preloaded_data = staticmethod(held)
MegatronEngine.train_step = recorded
sys.argv = ["examples/train.py", *sys.argv[2:]]
runpy.run_path("examples/train.py", run_name="__main__")
"""


def _command(out: Path, demo_shar: dict, max_steps: int) -> list[str]:
    sources = ", ".join(f"{{name: {task}, shar_dir: '{demo_shar[task]}', weight: 1.0}}" for task in ("tta", "text"))
    return [f"output_dir={out}", f"hydra.run.dir={out}/hydra", f"train.max_steps={max_steps}",
            "optim.warmup_steps=1", "train.global_batch_size=2", "train.micro_batch_size=1",
            "train.checkpoint_every_n_steps=2", "train.async_save=true", "data=shar", "data.tokenizer=byte",
            "data.seq_len=256", "data.shar.num_workers=0", "data.shar.window_size=8", "data.shar.max_tokens=512",
            f"data.shar.sources=[{sources}]"]


def _latest(out: Path) -> str:
    return (out / "checkpoints" / "latest").read_text().strip()


def test_kill_during_async_save_keeps_previous_latest_and_resumes(tmp_path, demo_shar):
    out, marker = tmp_path / "run", uuid.uuid4().hex
    env = {**os.environ, MARKER_VAR: marker, "PYTHONPATH": str(ROOT)}  # this checkout, whatever the venv points at
    log = (tmp_path / "train.log").open("w")
    cmd = [sys.executable, "-c", HOLD_SECOND_SAVE, str(out), *_command(out, demo_shar, 100)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        # the save of step 4 is held in its writer; step 5 still trains (the save of step 6 waits for it)
        while not ((out / "writer.held").exists() and (out / "step.5").exists()):
            assert proc.poll() is None, (tmp_path / "train.log").read_text()[-3000:]
            assert time.monotonic() < deadline, sorted(p.name for p in out.glob("*.*"))
            time.sleep(0.1)
        assert _latest(out) == "iter_0000002"
        assert (out / "checkpoints" / "iter_0000004.tmp").is_dir()
        sigkill_leaves_nothing(proc, marker, min_children=0)
        assert _latest(out) == "iter_0000002"  # the killed save published nothing
        assert (out / "checkpoints" / "iter_0000004.tmp").is_dir()
    finally:
        log.close()
        kill_marked(marker)

    # the next job: the partial folder goes, training resumes from step 2 and completes its asynchronous saves
    again = subprocess.run([sys.executable, "examples/train.py", *_command(out, demo_shar, 6)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    text = again.stdout + again.stderr
    assert again.returncode == 0, text[-3000:]
    assert "iter_0000004.tmp: a checkpoint save that did not complete" in text
    assert "resuming from" in text and "iter_0000002" in text
    assert _latest(out) == "iter_0000006"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["iter_0000002", "iter_0000004",
                                                                       "iter_0000006", "latest"]
