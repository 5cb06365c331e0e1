"""--shard: one generation job split over processes and merged back (inference/shards.py), on the real commands.

The reference is the unsharded run of the same command: shards 0/2 and 1/2 followed by the merging run give the
same manifest and byte-identical wavs. Also: a shard that lost a wav is redone by the merging run; a shard still
running (holding its lock) or made with other settings is refused, nothing merged; --shard slurm takes its
index from a Slurm array's variables (the real-Slurm array run is in tests/eval/test_evaluate_shards.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ualm_nemo.inference.jobs import OutputFolder
from ualm_nemo.inference.shards import Shard, parse_shard, shard_folders
from ualm_nemo.testing.examples import load_example, run_ok, run_refused

pytestmark = pytest.mark.timeout(300)
cli = load_example("generate")
CAPTIONS = ["a dog barks", "rain", "a high beep", "wind", "a door slams"]


def _argv(parts, out: Path, *extra: str) -> list[str]:
    captions = [a for c in CAPTIONS for a in ("--caption", c)]
    return ["--checkpoint", str(parts["hf"]), "--codec", str(parts["codec"]), "--out-dir", str(out),
            "--max-frames", "8", "--batch-size", "2", "--no-progress", *captions, *extra]


def _lines(out: Path) -> dict[str, dict]:
    return {e["id"]: e for e in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}


def _same_as(reference: Path, out: Path) -> None:
    assert _lines(out) == _lines(reference)
    for item_id in _lines(reference):
        assert (out / f"{item_id}.wav").read_bytes() == (reference / f"{item_id}.wav").read_bytes(), item_id


def test_shards_then_merge_equal_the_unsharded_run(tiny_export, tmp_path, capsys):
    whole, split = tmp_path / "whole", tmp_path / "split"
    run_ok(cli.main, _argv(tiny_export, whole), capsys)
    for k in (0, 1):
        printed = run_ok(cli.main, _argv(tiny_export, split, "--shard", f"{k}/2"), capsys)
        assert f"in {split / f'shard-{k}-of-2'}" in printed
    assert len(_lines(split / "shard-0-of-2")) == 3 and len(_lines(split / "shard-1-of-2")) == 2
    assert not (split / "manifest.jsonl").exists()
    printed = run_ok(cli.main, _argv(tiny_export, split), capsys)  # merges, nothing left to generate
    assert "merged shard shard-0-of-2: 3 finished items" in printed and "done: 0 written, 5 skipped" in printed
    assert shard_folders(split) == []
    _same_as(whole, split)


def test_a_lost_shard_wav_is_redone_by_the_merging_run(tiny_export, tmp_path, capsys):
    whole, split = tmp_path / "whole", tmp_path / "split"
    run_ok(cli.main, _argv(tiny_export, whole), capsys)
    run_ok(cli.main, _argv(tiny_export, split, "--shard", "0/2"), capsys)  # shard 1/2 never ran (a failed array task)
    (split / "shard-0-of-2" / "00002.wav").unlink()  # and one of shard 0's wavs is gone
    printed = run_ok(cli.main, _argv(tiny_export, split), capsys)
    assert "(1 without their wav, to be redone)" in printed and "done: 3 written, 2 skipped" in printed
    _same_as(whole, split)


def test_running_or_mismatched_shards_are_refused(tiny_export, tmp_path, capsys):
    split = tmp_path / "split"
    run_ok(cli.main, _argv(tiny_export, split, "--shard", "0/2"), capsys)
    run_ok(cli.main, _argv(tiny_export, split, "--shard", "1/2", "--cfg-scale", "2"), capsys)  # another setting
    with OutputFolder(split / "shard-0-of-2", {}):  # shard 0 is still running: it holds its folder's lock
        err = run_refused(cli.main, _argv(tiny_export, split), capsys)
    assert "another run is writing to" in err and "shard-0-of-2" in err
    err = run_refused(cli.main, _argv(tiny_export, split), capsys)
    assert "shard-1-of-2: item" in err and "cfg_scale 2.0 (here 3.0)" in err
    assert not (split / "manifest.jsonl").exists() and len(shard_folders(split)) == 2  # nothing merged
    printed = run_ok(cli.main, _argv(tiny_export, split, "--overwrite"), capsys)  # starting over discards every shard
    assert "discarded shard shard-1-of-2" in printed and shard_folders(split) == []
    assert len(_lines(split)) == 5


@pytest.mark.parametrize("text, message", [("2/2", "0 <= K < N"), ("1/0", "N >= 1"), ("a/b", "expected K/N"),
                                           ("slurm", "not a task of a Slurm array")])
def test_bad_shard_flags_are_refused_before_any_work(tiny_export, tmp_path, capsys, text, message, monkeypatch):
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    err = run_refused(cli.main, _argv(tiny_export, tmp_path / "never", "--shard", text), capsys)
    assert f"--shard {text!r}" in err and message in err
    assert not (tmp_path / "never").exists()


def test_slurm_array_variables_give_the_shard():
    def env(task, first, last, count, step=None):
        values = {"SLURM_ARRAY_TASK_ID": task, "SLURM_ARRAY_TASK_MIN": first, "SLURM_ARRAY_TASK_MAX": last,
                  "SLURM_ARRAY_TASK_COUNT": count}
        return {k: str(v) for k, v in values.items()} | ({"SLURM_ARRAY_TASK_STEP": str(step)} if step else {})

    assert parse_shard("slurm", env(3, 0, 7, 8)) == Shard(3, 8)
    assert parse_shard("slurm", env(5, 1, 8, 8)) == Shard(4, 8)  # --array=1-8
    assert parse_shard("slurm", env(4, 0, 6, 4, step=2)) == Shard(2, 4)  # --array=0-6:2
    with pytest.raises(ValueError, match="not one contiguous range"):
        parse_shard("slurm", env(3, 1, 5, 3))  # --array=1,3,5
    assert parse_shard(" 1 / 4 ") == Shard(1, 4) and Shard(1, 4).select(list(range(10))) == [1, 5, 9]
