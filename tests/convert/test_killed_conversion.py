"""A conversion killed outright (SIGKILL: no exception handler, no ``finally`` runs) never leaves output that
looks complete, and running it again succeeds and cleans up.

The kill is real; only its moment is fixed: a small wrapper runs the real CLI in the same process and sends
itself SIGKILL at the N-th call of one internal function (the import's N-th checkpoint chunk, the export's
N-th HF tensor), so the test does not depend on timing.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ualm_nemo.testing.hf_folders import make_hf_folder

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(300)

KILL_AT = """
import os, runpy, signal, sys
target, count = sys.argv[1], int(sys.argv[2])
calls = [0]

def killing(original):
    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == count:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)
    return wrapped

if target == "import":
    from ualm_nemo.distributed import streaming
    streaming._ResolvingPlanner.resolve_data = killing(streaming._ResolvingPlanner.resolve_data)
    script = "examples/convert_hf_to_ualm.py"
else:
    from ualm_nemo.convert import hf_folder
    hf_folder.ShardedWriter.add = killing(hf_folder.ShardedWriter.add)
    script = "examples/convert_ualm_to_hf.py"
sys.argv = [script, *sys.argv[3:]]
runpy.run_path(script, run_name="__main__")
"""


def _run(args: list[str], kill: tuple[str, int] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", KILL_AT, kill[0], str(kill[1]), *args] if kill else [sys.executable, *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)


def _import_args(hf: Path, out: Path) -> list[str]:
    return [str(hf), str(out), "--model", "tiny", "--no-audio-input", "--no-progress"]


def test_killed_import_publishes_nothing_and_a_rerun_completes(tmp_path):
    hf = make_hf_folder(tmp_path / "hf")
    out = tmp_path / "ckpt"
    killed = _run(_import_args(hf, out), kill=("import", 5))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (out / "latest").exists() and (out / "iter_0000000.tmp").is_dir()  # half-written, not published
    refused = _run(["examples/convert_ualm_to_hf.py", str(out), str(tmp_path / "hf_out"), "--no-progress"])
    assert refused.returncode == 2 and "an interrupted save leaves only *.tmp folders" in refused.stderr
    again = _run(["examples/convert_hf_to_ualm.py", *_import_args(hf, out)])
    assert again.returncode == 0, again.stderr[-2000:]
    assert (out / "latest").read_text() == "iter_0000000" and sorted(p.name for p in out.iterdir()) == \
        ["iter_0000000", "latest"]


def test_killed_export_leaves_no_output_and_a_rerun_completes(tmp_path):
    from ualm_nemo.convert.hf_folder import HFFolder

    hf = make_hf_folder(tmp_path / "hf")
    ckpt, out = tmp_path / "ckpt", tmp_path / "hf_out"
    assert _run(["examples/convert_hf_to_ualm.py", *_import_args(hf, ckpt)]).returncode == 0
    export = ["examples/convert_ualm_to_hf.py", str(ckpt), str(out), "--max-shard-size", "100KB", "--no-progress"]
    killed = _run(export[1:], kill=("export", 9))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not out.exists()
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith("hf_out.tmp-")]
    assert len(left) == 1 and any((tmp_path / left[0]).glob("model-part*.safetensors"))  # shards were written
    again = _run(export)
    assert again.returncode == 0, again.stderr[-2000:]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("hf_out.tmp-")]  # the killed one's folder too
    src, back = HFFolder(hf), HFFolder(out)
    assert sorted(src.keys()) == sorted(back.keys())
    assert all(torch.equal(src.get(k), back.get(k)) for k in src.keys())
