"""After ``kill -9`` of a real training run, no process of it is left (issue 13, class 7).

``examples/train.py`` trains from real Shar sources with 2 DataLoader workers (conf/data/shar.yaml's default)
and saves a checkpoint every 2 steps. The kill is a real SIGKILL from outside, of the main process only (what
the OOM killer or a failed node does; Slurm would also kill the job's cgroup, a plain ``kill -9`` does not); only
its moment is fixed: a small wrapper runs the real entry point and, from the second save on, makes megatron's
bucket writer announce itself and wait, so the kill lands while a checkpoint is being written, after one was
completed (every helper a save ever starts has been started), with the loader's workers alive.

Every process the run starts inherits a marker in its environment, so survivors are found even if they left the
session or were adopted by PID 1. Upstream megatron-core, one forked bucket writer hung forever here.
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

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]

PAUSE_IN_SECOND_SAVE = """
import os, runpy, sys, threading, time
from pathlib import Path

from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

out, write_bucket = Path(sys.argv[1]), FileSystemWriterAsync.write_preloaded_data

def announcing(*args, **kwargs):  # wherever megatron runs a bucket writer (a forked process upstream)
    if (out / "checkpoints" / "latest").exists():
        (out / f"writer.{os.getpid()}.{threading.get_ident()}").write_text("")
        time.sleep(5)  # the test kills the trainer meanwhile; upstream, the writer then goes on and hangs
    return write_bucket(*args, **kwargs)

FileSystemWriterAsync.write_preloaded_data = staticmethod(announcing)
sys.argv = ["examples/train.py", *sys.argv[2:]]
runpy.run_path("examples/train.py", run_name="__main__")
"""


def test_nothing_of_a_killed_training_run_is_left(tmp_path, demo_shar):
    out, marker = tmp_path / "run", uuid.uuid4().hex
    sources = ", ".join(f"{{name: {task}, shar_dir: '{demo_shar[task]}', weight: 1.0}}" for task in ("tta", "text"))
    cmd = [sys.executable, "-c", PAUSE_IN_SECOND_SAVE, str(out), f"output_dir={out}", f"hydra.run.dir={out}/hydra",
           "train.max_steps=100", "optim.warmup_steps=1", "train.global_batch_size=2", "train.micro_batch_size=1",
           "train.checkpoint_every_n_steps=2", "data=shar", "data.tokenizer=byte", "data.seq_len=256",
           "data.shar.num_workers=2", "data.shar.window_size=8", "data.shar.max_tokens=512",
           f"data.shar.sources=[{sources}]"]
    log = (tmp_path / "train.log").open("w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, MARKER_VAR: marker}, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while len(list(out.glob("writer.*"))) < 2:  # megatron writes 2 buckets (thread_count=2) per rank
            assert proc.poll() is None, (tmp_path / "train.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"not 2 bucket writers: {list(out.glob('writer.*'))}"
            time.sleep(0.1)
        assert (out / "checkpoints" / "latest").read_text().strip() == "iter_0000002"
        sigkill_leaves_nothing(proc, marker, min_children=2)  # the loader's workers (and any save helper)
        # the save it was killed in published nothing: the completed checkpoint is still the latest
        assert (out / "checkpoints" / "latest").read_text().strip() == "iter_0000002"
    finally:
        log.close()
        kill_marked(marker)
