"""examples/generate.py (text-to-audio command) end to end on real parts: a tiny Qwen2 imported into a training
checkpoint and exported to an HF folder (one subprocess, shared by the module), the tiny X-Codec, the byte
tokenizer.

The command runs in-process (``main(argv)``) on the exported folder; loading a training checkpoint initialises
torch.distributed (and, on CPU, the megatron CPU shim) process-wide, so the training-checkpoint form runs once
as a real subprocess and must give the same audio. Covered: batching (batch == single), the manifest, resume
after a simulated kill, settings mismatch and --overwrite, and inputs refused before any work.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile
import torch

from ualm_nemo.testing.examples import load_example, run_ok, run_refused

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(300)

FIELDS = {"id", "caption", "seed", "cfg_scale", "temperature", "top_k", "max_frames", "min_frames", "audio",
          "sample_rate", "frames", "duration", "checkpoint", "dtype", "enhancer"}
CAPTIONS = [{"caption": "a dog barks twice in a large hall", "id": "dog"}, {"caption": "rain"},
            {"caption": "a high beep", "seed": 41}]

cli = load_example("generate")


@pytest.fixture(scope="module")
def parts(tiny_export):
    return tiny_export


def _write_jsonl(path: Path, rows: list, blank_lines: bool = True) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text(("\n\n" if blank_lines else "\n").join(lines) + "\n")
    return path


def _argv(parts, out: Path, *extra: str, checkpoint: Path | None = None) -> list[str]:
    return ["--checkpoint", str(checkpoint or parts["hf"]), "--codec", str(parts["codec"]), "--out-dir", str(out),
            "--max-frames", "8", "--no-progress", *extra]


def _manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def _full_run(parts, tmp_path, capsys, out: Path, *extra: str) -> Path:
    captions = _write_jsonl(tmp_path / "captions.jsonl", CAPTIONS)
    run_ok(cli.main, _argv(parts, out, "--captions", str(captions), "--caption", "wind", "--batch-size", "2", *extra), capsys)
    return captions


def _audio(path: Path):
    data, rate = soundfile.read(path, dtype="int16")
    return data, rate


def test_batches_write_wavs_and_manifest_and_equal_single(parts, tmp_path, capsys):
    out = tmp_path / "out"
    captions = _write_jsonl(tmp_path / "captions.jsonl", CAPTIONS)
    argv = _argv(parts, out, "--captions", str(captions), "--caption", "wind", "--batch-size", "2", "--seed", "10")
    argv.remove("--no-progress")  # the progress bar runs too (to stderr)
    printed = run_ok(cli.main, argv, capsys)
    assert "done: 4 written, 0 skipped" in printed and str(out) in printed
    entries = _manifest(out)
    assert [e["id"] for e in entries] == ["dog", "00001", "00002", "00003"]
    assert [e["seed"] for e in entries] == [10, 11, 41, 13]  # --seed + index unless the line sets one
    assert [e["caption"] for e in entries] == [c["caption"] for c in CAPTIONS] + ["wind"]
    for e in entries:
        assert set(e) == FIELDS and e["audio"] == f"{e['id']}.wav"
        assert (e["cfg_scale"], e["temperature"], e["top_k"], e["max_frames"], e["min_frames"]) == (3.0, 0.8, 20, 8, 1)
        data, rate = _audio(out / e["audio"])
        assert rate == e["sample_rate"] == 16000 and data.ndim == 1
        assert 1 <= e["frames"] <= 8 and len(data) == e["frames"] * 320
        assert math.isclose(e["duration"], e["frames"] / 50)
    assert sorted(p.name for p in out.iterdir()) == sorted(["manifest.jsonl", *(e["audio"] for e in entries)])

    # "rain" was the short, left-padded row of the first batch: alone (batch 1, same seed) it gives the same wav
    alone = tmp_path / "alone"
    run_ok(cli.main, _argv(parts, alone, "--caption", "rain", "--seed", "11", "--batch-size", "1"), capsys)
    (single,) = _manifest(alone)
    assert single["frames"] == entries[1]["frames"]
    assert (_audio(alone / "00000.wav")[0] == _audio(out / "00001.wav")[0]).all()


def test_resume_after_a_killed_run_redoes_only_the_missing_items(parts, tmp_path, capsys):
    out = tmp_path / "out"
    argv = _argv(parts, out, "--captions", str(_full_run(parts, tmp_path, capsys, out)), "--caption", "wind",
                 "--batch-size", "2")
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*.wav")}
    # the kill: 00001's wav and line gone, 00003's line torn mid-write (its wav was already in place), and a
    # half-written temporary wav left behind
    lines = (out / "manifest.jsonl").read_text().splitlines(keepends=True)
    assert [json.loads(line)["id"] for line in lines] == ["dog", "00001", "00002", "00003"]
    (out / "manifest.jsonl").write_text(lines[0] + lines[2] + lines[3][: len(lines[3]) // 2])
    (out / "00001.wav").unlink()
    (out / ".00001.wav.partial").write_bytes(b"RIFF\x00\x00")

    printed = run_ok(cli.main, argv, capsys)
    assert "2 of 4 items already done (skipped), 2 to generate" in printed
    assert "done: 2 written, 2 skipped" in printed and "incomplete last line" in printed
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*.wav")}
    assert after.keys() == before.keys() and not list(out.glob(".*"))  # temporary file removed
    for name in ("dog.wav", "00002.wav"):
        assert after[name] == before[name]  # not rewritten
    for name in ("00001.wav", "00003.wav"):
        assert after[name][0] != before[name][0] and after[name][2] == before[name][2]  # rewritten, same audio
    entries = _manifest(out)
    assert sorted(e["id"] for e in entries) == ["00001", "00002", "00003", "dog"]  # each once, all whole lines

    assert "done: 0 written, 4 skipped" in run_ok(cli.main, argv, capsys)  # nothing left to do: the model is not even loaded


def test_other_settings_are_refused_and_overwrite_starts_over(parts, tmp_path, capsys):
    out = tmp_path / "out"
    captions = _full_run(parts, tmp_path, capsys, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    base = ["--captions", str(captions), "--caption", "wind", "--batch-size", "2"]
    err = run_refused(cli.main, _argv(parts, out, *base, "--cfg-scale", "2"), capsys)
    assert "other settings" in err and "cfg_scale 3.0 -> 2.0" in err and "--overwrite" in err and "--out-dir" in err
    err = run_refused(cli.main, _argv(parts, out, "--captions", str(captions), "--caption", "gusty wind"), capsys)
    assert "00003: caption 'wind' -> 'gusty wind'" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # refused: nothing touched

    printed = run_ok(cli.main, _argv(parts, out, "--captions", str(captions), "--cfg-scale", "2", "--overwrite"), capsys)
    assert "done: 3 written, 0 skipped" in printed
    entries = _manifest(out)
    assert [e["id"] for e in entries] == ["dog", "00001", "00002"] and {e["cfg_scale"] for e in entries} == {2.0}
    assert sorted(p.name for p in out.iterdir()) == ["00001.wav", "00002.wav", "dog.wav", "manifest.jsonl"]


def test_bad_caption_lines_are_all_reported_before_loading(parts, tmp_path, capsys):
    bad = _write_jsonl(tmp_path / "bad.jsonl", [
        {"caption": "fine", "id": "a"},
        '{"caption": "unterminated',
        {"id": "b"},
        {"caption": "   "},
        {"caption": 5},
        {"caption": "x" * 40},
        {"caption": "again", "id": "a"},
        {"caption": "fine", "id": "../escape"},
        {"caption": "fine", "seed": -1},
        "[1, 2]",
    ], blank_lines=False)
    out = tmp_path / "out"
    # --checkpoint is an existing folder that is no checkpoint: a load would fail with another message
    err = run_refused(cli.main, _argv(parts, out, "--captions", str(bad), "--max-caption-chars", "20", checkpoint=tmp_path),
                   capsys)
    assert "9 bad caption item(s)" in err
    for line, reason in [(2, "invalid JSON"), (3, 'no "caption"'), (4, "empty caption"),
                         (5, "caption must be a string"),
                         (6, "caption has 40 characters, more than --max-caption-chars 20"),
                         (7, f"duplicate id 'a' (first at {bad}:1)"), (8, "id '../escape' cannot name a file"),
                         (9, "seed -1"), (10, "expected a JSON object")]:
        assert f"{bad}:{line}: {reason}" in err, (line, err)
    assert f"{bad}:1:" not in err and "cannot load" not in err and not out.exists()


@pytest.mark.parametrize("extra, message", [
    (["--cfg-scale", "nan"], ("--cfg-scale nan:", "must be finite and > 0")),
    (["--cfg-scale", "-5"], ("--cfg-scale -5.0:", "must be finite and > 0")),
    (["--cfg-scale", "inf"], ("--cfg-scale inf:", "must be finite and > 0")),
    (["--max-frames", "0"], ("--max-frames 0:", "must be >= 1")),
    (["--min-frames", "9"], ("--min-frames 9:", "must lie between 1 and max_frames (8)")),
    (["--temperature", "nan"], ("--temperature nan:", "must be finite and >= 0")),
    (["--temperature", "-1"], ("--temperature -1.0:", "must be finite and >= 0")),
    (["--top-k", "-1"], ("--top-k -1:", "must be >= 0")),
    (["--batch-size", "0"], ("--batch-size 0: must be >= 1",)),
    (["--seed", "-1"], ("--seed -1: must be >= 0",)),
    (["--max-caption-chars", "0"], ("--max-caption-chars 0: must be >= 1",)),
    (["--device", "gpu7"], ("--device gpu7: not a torch device",)),
    (["--caption", ""], ("--caption #1: empty caption",)),
    (["--caption", "ok", "--caption", "  "], ("--caption #2: empty caption",)),
    ([], ("no captions: give --caption",)),
])
def test_bad_flags_are_one_clear_line(parts, tmp_path, capsys, extra, message):
    argv = _argv(parts, tmp_path / "out", *extra)
    if "--caption" not in extra and extra:
        argv += ["--caption", "rain"]
    err = run_refused(cli.main, argv, capsys)
    assert all(part in err for part in message), err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_a_gpu_is_refused(parts, tmp_path, capsys):
    err = run_refused(cli.main, _argv(parts, tmp_path / "out", "--caption", "rain", "--device", "cuda"), capsys)
    assert "--device cuda: CUDA is not available here" in err


def test_missing_folders_and_empty_file(parts, tmp_path, capsys):
    out = tmp_path / "out"
    err = run_refused(cli.main, _argv(parts, out, "--caption", "rain", checkpoint=tmp_path / "nope"), capsys)
    assert f"--checkpoint {tmp_path / 'nope'}: no such checkpoint" in err
    err = run_refused(cli.main, _argv(parts, out, "--caption", "rain") + ["--codec", str(tmp_path)], capsys)
    assert f"--codec {tmp_path}: not an X-Codec folder" in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    assert f"{empty}: no captions in the file" in run_refused(cli.main, _argv(parts, out, "--captions", str(empty)), capsys)
    err = run_refused(cli.main, _argv(parts, out, "--captions", str(tmp_path / "none.jsonl")), capsys)
    assert f"{tmp_path / 'none.jsonl'}: no such file" in err
    err = run_refused(cli.main, _argv(parts, empty, "--caption", "rain"), capsys)
    assert f"--out-dir {empty}: exists and is not a folder" in err
    assert not out.exists()


def test_training_checkpoint_through_the_command_line(parts, tmp_path, capsys):
    """``python examples/generate.py`` on the training checkpoint (read into the HF-side class) gives the same
    wav as the exported folder."""
    ref = tmp_path / "ref"
    run_ok(cli.main, _argv(parts, ref, "--caption", "rain", "--seed", "3"), capsys)
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "examples/generate.py",
                           *_argv(parts, out, "--caption", "rain", "--seed", "3", checkpoint=parts["ckpt"])],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"done: 1 written, 0 skipped (already done), in {out}" in done.stdout
    drop = lambda entries: [{k: v for k, v in e.items() if k != "checkpoint"} for e in entries]  # noqa: E731
    assert drop(_manifest(out)) == drop(_manifest(ref))  # the same but for the checkpoint each names
    assert _manifest(out)[0]["checkpoint"] == str(Path(parts["ckpt"]).resolve())
    assert (out / "00000.wav").read_bytes() == (ref / "00000.wav").read_bytes()


def test_a_second_run_on_the_same_out_dir_is_refused(parts, tmp_path, capsys):
    import fcntl
    import os

    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # what a running generate.py holds
        err = run_refused(cli.main, _argv(parts, out, "--caption", "rain"), capsys)
    finally:
        os.close(fd)
    assert f"another run is writing to {out}" in err and not list(out.iterdir())


def test_a_caption_over_the_context_rule_is_a_counted_skip(parts, tmp_path, capsys):
    """The context rule (pipeline.UALMInference.prepare) refuses one caption of a batch: that item is a skipped
    manifest line with the reason, the rest of the batch is written, the run ends normally."""
    out = tmp_path / "out"
    captions = _write_jsonl(tmp_path / "captions.jsonl", [{"caption": "rain", "id": "short"},
                                                          {"caption": "a long " * 200, "id": "long"}])
    printed = run_ok(cli.main, _argv(parts, out, "--captions", str(captions), "--batch-size", "2",
                                     "--max-context", "600"), capsys)
    assert "1 written" in printed and "1 refused by the input checks" in printed
    entries = {e["id"]: e for e in _manifest(out)}
    assert entries["short"]["audio"] == "short.wav" and (out / "short.wav").is_file()
    assert entries["long"]["frames"] == 0 and "prompt too long" in entries["long"]["skipped"]
