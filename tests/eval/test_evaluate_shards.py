"""evaluate.py understanding split over a real Slurm array (``sbatch --array=0-1``, each task ``--shard slurm``),
then the unsharded command merges and scores: the report equals the one-process run's, item for item. The TTA
suite's --shard paths are refused where they cannot apply (scoring only, an unmerged --generated folder)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from ualm_nemo.testing.eval_sets import write_mmau_set
from ualm_nemo.testing.examples import load_example

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _argv(tiny_export, data: Path, out: Path) -> list[str]:
    return ["understanding", "--benchmark", "mmau", "--data", str(data), "--checkpoint", str(tiny_export["hf"]),
            "--max-answer-tokens", "4", "--batch-size", "2", "--out-dir", str(out), "--no-progress"]


def test_slurm_array_shards_merge_into_the_same_report(slurm, tiny_export, tmp_path, capsys):
    data = write_mmau_set(tmp_path, tiny_export["tone"])
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert load_example("evaluate").main(_argv(tiny_export, data, whole)) == 0
    command = shlex.join([sys.executable, str(ROOT / "examples" / "evaluate.py"),
                          *_argv(tiny_export, data, split), "--shard", "slurm"])
    done = subprocess.run(["sbatch", "--wait", "--array=0-1", f"--output={tmp_path}/%A_%a.log", "--chdir", str(ROOT),
                           f"--export=ALL,PYTHONPATH={ROOT},OMP_NUM_THREADS=1", "--wrap", command],
                          capture_output=True, text=True, timeout=540)
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("*.log")))
    assert done.returncode == 0, done.stderr + logs
    assert "shard 0/2: 2 questions answered" in logs and "shard 1/2: 2 questions answered" in logs, logs
    capsys.readouterr()
    assert load_example("evaluate").main(_argv(tiny_export, data, split)) == 0  # merges, answers nothing, scores
    printed = capsys.readouterr().out
    assert "merged shard shard-0-of-2: 2 finished items" in printed and "already answered" in printed
    one, merged = (json.loads((d / "report.json").read_text()) for d in (whole, split))
    assert sorted(merged["items"], key=lambda i: i["id"]) == sorted(one["items"], key=lambda i: i["id"])
    assert (merged["total"], merged["unanswered"], merged["accuracy"]) == (one["total"], one["unanswered"],
                                                                            one["accuracy"])


def test_tta_shards_are_refused_where_they_cannot_apply(tiny_export, tmp_path, capsys):
    run = load_example("evaluate").main
    generated = tmp_path / "generated"
    (generated / "shard-0-of-2").mkdir(parents=True)
    (generated / "manifest.jsonl").write_text("")
    for argv, message in ((["--generated", str(generated), "--shard", "0/2"], "--shard splits the generation"),
                          (["--generated", str(generated)], "holds 1 unmerged shard folder(s)")):
        with pytest.raises(SystemExit):
            run(["tta", "--metrics", "clap", "--clap", str(tiny_export["tone"]), *argv])
        assert message in capsys.readouterr().err
