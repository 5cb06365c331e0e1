"""Bad input to the data commands (issue 13): the tokenize stage rejects (counts, names) a clip it cannot encode
instead of aborting the shard (class 1); a resume cannot change the stage's settings, killed runs' temporary
files are removed, a repeated prepare --source is refused (class 4); their numbers are checked first (class 5)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from ualm_nemo.data.tokenize_stage import tokenize_source
from ualm_nemo.data.cuts import prepare_source
from ualm_nemo.data.shar import read_rejects, read_shar
from ualm_nemo.testing.examples import load_example
from ualm_nemo.testing.fake_codec import HashCodec

ROOT = Path(__file__).resolve().parents[2]


def _tone(seconds: float) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * 440 * np.arange(round(seconds * 16000)) / 16000)).astype(np.float32)


@pytest.fixture()
def prepared(tmp_path):
    """A prepared TTA source of 5 clips (0.5 .. 0.9 s), origins c0..c4."""
    lines = []
    for i in range(5):
        sf.write(str(tmp_path / f"c{i}.wav"), _tone(0.5 + 0.1 * i), 16000, subtype="FLOAT")
        lines.append(json.dumps({"location": f"c{i}.wav", "start_time": 0.0, "end_time": 0.5 + 0.1 * i,
                                 "duration": 0.5 + 0.1 * i, "caption": f"tone {i}", "sample_rate": 16000}))
    (tmp_path / "tta.jsonl").write_text("\n".join(lines) + "\n")
    assert prepare_source("tta", tmp_path / "tta.jsonl", tmp_path / "prep").num_records == 5
    return tmp_path


def test_non_finite_audio_after_preparation_is_rejected_not_encoded(prepared, monkeypatch, capsys):
    """NaN / inf samples written after prepare: the real tiny codec would give all-zero codes without a word."""
    for name, value in (("c1.wav", np.nan), ("c3.wav", np.inf)):
        wav = _tone(0.5 + 0.1 * int(name[1]))
        wav[100] = value
        sf.write(str(prepared / name), wav, 16000, subtype="FLOAT")
    monkeypatch.setattr("sys.argv", ["tokenize_audio.py", "--cuts", str(prepared / "prep" / "cuts.jsonl.gz"),
                                     "--out", str(prepared / "shar"), "--codec", "tiny", "--shard-size", "10",
                                     "--no-progress"])
    load_example("tokenize_audio").main()
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["cuts"], summary["rejects"]) == (3, 2)
    rejects = read_rejects(prepared / "shar")
    assert sorted(r["origin"] for r in rejects) == ["c1.wav@0.0", "c3.wav@0.0"]
    assert all("non-finite samples" in r["reason"] for r in rejects)
    cuts = list(read_shar(prepared / "shar"))
    assert [c.custom["caption"] for c in cuts] == ["tone 0", "tone 2", "tone 4"]
    assert all(c.load_codec_tokens().any() for c in cuts)


class _CodecFailingOnLongClips(HashCodec):
    """Stands in for a real codec failure (out of GPU memory on one long clip: no GPU here, and the tiny codec
    never fails on finite audio) — fails any call holding a clip longer than 0.75 s."""

    def encode(self, wavs):
        if any(w.shape[0] > 12000 for w in wavs):
            raise RuntimeError("CUDA out of memory (stand-in)")
        return super().encode(wavs)


def test_a_clip_that_fails_to_encode_is_rejected_and_the_shard_finishes(prepared, caplog):
    report = tokenize_source(prepared / "prep" / "cuts.jsonl.gz", prepared / "shar", _CodecFailingOnLongClips(),
                             shard_size=10, progress=False)
    assert (report.num_cuts, report.num_rejects, report.shards_written) == (3, 2, [0])
    rejects = read_rejects(prepared / "shar")
    assert [r["origin"] for r in rejects] == ["c3.wav@0.0", "c4.wav@0.0"]
    assert all("codec failed to encode the clip: RuntimeError: CUDA out of memory" in r["reason"] for r in rejects)
    assert "one at a time" in caplog.text
    good = {c.custom["caption"]: c.load_codec_tokens() for c in read_shar(prepared / "shar")}
    assert sorted(good) == ["tone 0", "tone 1", "tone 2"]
    alone = tokenize_source(prepared / "prep" / "cuts.jsonl.gz", prepared / "shar_ok", HashCodec(), shard_size=10,
                            progress=False)
    assert alone.num_rejects == 0
    for cut in read_shar(prepared / "shar_ok"):  # the good clips got exactly the codes a clean run gives them
        if cut.custom["caption"] in good:
            assert np.array_equal(good[cut.custom["caption"]], cut.load_codec_tokens())


def _tokenize(prepared, monkeypatch, *flags: str) -> None:
    monkeypatch.setattr("sys.argv", ["tokenize_audio.py", "--cuts", str(prepared / "prep" / "cuts.jsonl.gz"),
                                     "--out", str(prepared / "shar"), "--codec", "tiny", "--no-progress", *flags])
    load_example("tokenize_audio").main()


def _refused(run, capsys) -> str:
    with pytest.raises(SystemExit) as refused:
        run()
    assert refused.value.code == 2
    return capsys.readouterr().err


def test_resume_with_another_shard_size_is_refused(prepared, monkeypatch, capsys):
    _tokenize(prepared, monkeypatch, "--shard-size", "2", "--shards", "0:1")  # half written: shard 0 of 3
    meta = prepared / "shar" / "meta"
    err = _refused(lambda: _tokenize(prepared, monkeypatch, "--shard-size", "3"), capsys)
    assert "--shard-size: written with 2, this run 3" in err and f"delete {prepared / 'shar'}" in err
    assert sorted(p.name for p in meta.glob("0*.json")) == ["000000.json"]  # nothing written by the refused run
    (meta / "stage.json").unlink()  # an output of an older version, without recorded settings: checked by counts
    err = _refused(lambda: _tokenize(prepared, monkeypatch, "--shard-size", "3"), capsys)
    assert "shard 0 has 2 cuts, --shard-size 3 over 5 cuts gives it 3" in err
    _tokenize(prepared, monkeypatch, "--shard-size", "2")  # the recorded settings resume
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["written"], summary["skipped_finished"]) == (2, 1)
    captions = sorted(c.custom["caption"] for c in read_shar(prepared / "shar"))
    assert captions == [f"tone {i}" for i in range(5)]  # every cut, once
    assert json.loads((meta / "stage.json").read_text())["shard_size"] == 2


PAUSE_IN_SHARD_1 = """
import os, runpy, sys, time
from pathlib import Path

marker = Path(sys.argv[1])

def pause():  # the test sends SIGKILL meanwhile
    marker.write_text(str(os.getpid()))
    time.sleep(120)

replace = os.replace

def publishing(src, dst, *args, **kwargs):
    replace(src, dst, *args, **kwargs)
    if Path(dst).parent.name == "shards" and ".000001." in Path(dst).name:
        pause()  # shard 1 is half published: one file in shards/, the rest (cuts file last) and meta not

os.replace = publishing
sys.argv = ["examples/tokenize_audio.py", *sys.argv[2:]]
runpy.run_path("examples/tokenize_audio.py", run_name="__main__")
"""


def test_a_run_killed_mid_shard_is_cleaned_up_and_every_cut_comes_out_once(prepared, monkeypatch, capsys):
    """A real tokenize run gets a real SIGKILL from outside inside shard 1 of 3, the moment fixed by a wrapper:
    shard 1 written to its temporary folder and its first file renamed into shards/ (the cuts file, which lands
    last, and the meta file not yet). The rerun removes the leftovers, rewrites shard 1 and yields every good cut
    exactly once and the one reject once."""
    wav = _tone(0.8)
    wav[100] = np.nan  # c3 (shard 1) goes bad after preparation: a tokenize-time reject
    sf.write(str(prepared / "c3.wav"), wav, 16000, subtype="FLOAT")
    shar, marker = prepared / "shar", prepared / "paused"
    args = ["--cuts", str(prepared / "prep" / "cuts.jsonl.gz"), "--out", str(shar), "--codec", "tiny",
            "--shard-size", "2", "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-c", PAUSE_IN_SHARD_1, str(marker), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the run never reached shard 1"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    left = sorted(p.name for p in shar.glob(".tmp-000001-*"))
    assert left == [f".tmp-000001-{proc.pid}"] and not (shar / "meta" / "000001.json").exists()
    in_shards = sorted(p.name for p in (shar / "shards").glob("*.000001.*"))
    assert len(in_shards) == 1 and not in_shards[0].startswith("cuts."), in_shards
    assert sorted(p.name for p in (shar / "meta").glob("0*.json")) == ["000000.json"]

    _tokenize(prepared, monkeypatch, "--shard-size", "2")
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["written"], summary["skipped_finished"], summary["cuts"], summary["rejects"]) == (2, 1, 2, 1)
    assert not list(shar.glob(".tmp-*")) and not list((shar / "meta").glob("*.tmp"))
    cuts = list(read_shar(shar))
    assert sorted(c.custom["origin"] for c in cuts) == ["c0.wav@0.0", "c1.wav@0.0", "c2.wav@0.0", "c4.wav@0.0"]
    assert len({c.id for c in cuts}) == 4 and all(c.load_codec_tokens().any() for c in cuts)
    assert [r["origin"] for r in read_rejects(shar)] == ["c3.wav@0.0"]  # 4 + 1 = the 5 prepared records


def test_stage_numbers_are_checked_before_work(prepared, monkeypatch, capsys):
    for flags, flag in ((["--shard-size", "0"], "--shard-size"), (["--shard-size", "abc"], "--shard-size"),
                        (["--batch-size", "-1"], "--batch-size"), (["--shards", "a:b"], "--shards"),
                        (["--world", "0"], "--world")):
        err = _refused(lambda: _tokenize(prepared, monkeypatch, *flags), capsys)
        assert f"argument {flag}:" in err, err
    err = _refused(lambda: _tokenize(prepared, monkeypatch, "--shards", "3:1"), capsys)
    assert "shard range 3:1 is empty" in err
    assert not (prepared / "shar").exists()


def test_prepare_refuses_a_repeated_source_name(prepared, monkeypatch, capsys):
    prepare = load_example("prepare_data")
    manifest = prepared / "tta.jsonl"
    monkeypatch.setattr("sys.argv", ["prepare_data.py", "--out", str(prepared / "p2"), "--source",
                                     f"a=tta:{manifest}", "--source", f"b=tta:{manifest}", "--source",
                                     f"a=text:{manifest}"])
    err = _refused(prepare.main, capsys)
    assert "--source name(s) a given more than once" in err
    assert not (prepared / "p2").exists()


def test_a_shard_whose_every_cut_was_rejected_stays_readable_by_lhotse(prepared):
    """Shard 1 (c2, c3) loses both clips: it keeps one (empty) file per field, as the other shards have, so
    Lhotse's own reader (``CutSet.from_shar``, by folder and by field lists) and ``read_shar`` read the folder."""
    from lhotse import CutSet

    for name in ("c2.wav", "c3.wav"):
        wav = _tone(0.5 + 0.1 * int(name[1]))
        wav[100] = np.nan
        sf.write(str(prepared / name), wav, 16000, subtype="FLOAT")
    report = tokenize_source(prepared / "prep" / "cuts.jsonl.gz", prepared / "shar", HashCodec(), shard_size=2,
                             progress=False)
    assert (report.num_cuts, report.num_rejects, report.shards_written) == (3, 2, [0, 1, 2])
    shards = prepared / "shar" / "shards"
    names = sorted(p.name for p in shards.iterdir())
    assert [n for n in names if ".000001." in n] == ["codec_tokens.000001.tar", "cuts.000001.jsonl.gz",
                                                      "recording.000001.tar"]
    for cuts in (CutSet.from_shar(in_dir=str(shards)), read_shar(prepared / "shar")):
        loaded = [(c.custom["caption"], c.load_audio().shape, c.load_codec_tokens().shape) for c in cuts]
        assert [caption for caption, _, _ in loaded] == ["tone 0", "tone 1", "tone 4"]
    fields = {f: sorted(str(p) for p in shards.glob(f"{f}.*")) for f in ("cuts", "recording", "codec_tokens")}
    assert len(CutSet.from_shar(fields=fields).to_eager()) == 3


def test_a_raw_manifest_given_as_cuts_is_one_line(prepared, monkeypatch, capsys):
    """The raw jsonl (plain or gzipped) or an empty file where prepared cuts belong: one line saying what was
    expected, before anything is written."""
    import gzip

    raw = (prepared / "tta.jsonl").read_bytes()
    (prepared / "raw.jsonl.gz").write_bytes(gzip.compress(raw))
    (prepared / "empty.jsonl.gz").write_bytes(gzip.compress(b""))
    for name, why in (("tta.jsonl", "not gzip-compressed"), ("raw.jsonl.gz", "first line is not a Lhotse cut"),
                      ("empty.jsonl.gz", "holds no cut")):
        monkeypatch.setattr("sys.argv", ["tokenize_audio.py", "--cuts", str(prepared / name), "--out",
                                         str(prepared / "shar"), "--no-progress"])
        err = _refused(load_example("tokenize_audio").main, capsys)
        line = err.strip().splitlines()[-1]
        assert line.startswith("tokenize_audio.py: error: --cuts ") and "expected a prepared cuts.jsonl.gz" in line
        assert why in line and "Traceback" not in err
    assert not (prepared / "shar").exists()
