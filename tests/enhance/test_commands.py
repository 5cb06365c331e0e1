"""The enhancer's commands end to end: export a trained run, evaluate it against the baseline, and generate
48 kHz stereo with ``generate.py --enhancer`` (the tiny exported UALM of the suite's fixture)."""

from __future__ import annotations

import json

import pytest
import soundfile
import torch

from ualm_nemo.enhance.export import load_enhancer
from ualm_nemo.testing.enhancer_clips import write_clips
from ualm_nemo.testing.examples import load_example

generate_cli = load_example("generate")
export_cli = load_example("export_enhancer")
evaluate_cli = load_example("evaluate_enhancer")


def test_generate_writes_48k_stereo_with_the_enhancer(tiny_export, tiny_enhancer, tmp_path, capsys):
    exported = tiny_enhancer
    out = tmp_path / "gen"
    argv = ["--checkpoint", str(tiny_export["hf"]), "--codec", str(tiny_export["codec"]), "--out-dir", str(out),
            "--max-frames", "8", "--min-frames", "4", "--no-progress", "--caption", "a high beep"]
    assert generate_cli.main([*argv, "--enhancer", str(exported)]) == 0
    entry = json.loads((out / "manifest.jsonl").read_text().splitlines()[0])
    wav, rate = soundfile.read(out / entry["audio"], always_2d=True)
    assert rate == entry["sample_rate"] == 48000 and wav.shape[1] == 2
    assert wav.shape[0] == 3 * 320 * entry["frames"]  # the codec's 16 kHz length, times 3
    assert entry["enhancer"] == str(exported.resolve())
    # the enhancer is a setting of the folder: the same folder without it is refused, not mixed
    with pytest.raises(SystemExit):
        generate_cli.main(argv)
    assert "--overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generate_cli.main([*argv, "--out-dir", str(tmp_path / "g2"), "--enhancer", str(tmp_path / "nope")])
    assert "--enhancer: cannot load" in capsys.readouterr().err


def test_export_and_evaluate_commands(tmp_path, capsys):
    from ualm_nemo.enhance.config import EnhancerRun
    from ualm_nemo.enhance.training import train_enhancer

    data = tmp_path / "clips"
    write_clips(data, 2, 0.5)
    run = EnhancerRun.from_dict({"output_dir": str(tmp_path / "run"), "model": {"preset": "tiny"},
                                 "loss": {"discriminator_filters": 4, "discriminator_ffts": [512, 128]},
                                 "train": {"data": str(data), "segment_seconds": 0.08, "global_batch_size": 1,
                                           "max_steps": 2, "num_workers": 0, "checkpoint_every_n_steps": 2}})
    train_enhancer(run, progress=False)
    assert export_cli.main(["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "exp")]) == 0
    assert "EMA weights" in capsys.readouterr().out
    x = torch.randn(1, 1, 3200)
    assert torch.equal(load_enhancer(tmp_path / "exp").enhance(x), load_enhancer(tmp_path / "run").enhance(x))

    (data / "silent.wav").write_bytes(b"")  # unreadable: listed, not scored, not hidden
    assert evaluate_cli.main(["--enhancer", str(tmp_path / "exp"), "--data", str(data), "--out-dir",
                              str(tmp_path / "eval"), "--no-progress"]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["clips"] == 2 and report["skipped"] == 1 and len(report["items"]) == 2
    assert report["skipped_items"][0]["reason"].startswith("unreadable")
    assert set(report["baseline"]) == set(report["enhancer"]) >= {"lsd", "lsd_high", "mrstft", "low_band_lsd"}
    assert "| baseline |" in (tmp_path / "eval" / "report.md").read_text()
    with pytest.raises(SystemExit):
        evaluate_cli.main(["--enhancer", str(tmp_path / "missing"), "--data", str(data)])
    assert "no such file" in capsys.readouterr().err


def test_codec_round_trip_degrades_the_input_like_generated_audio(tiny_export):
    from ualm_nemo.enhance.codec_round_trip import CodecRoundTrip

    codec = CodecRoundTrip.from_pretrained(tiny_export["codec"])
    wav = torch.randn(2, 1, 3200 + 100) * 0.1  # not a whole number of 320-sample codec frames
    out = codec(wav)
    assert out.shape == wav.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, wav)  # the real (tiny, random) codec changes the audio
    assert torch.equal(out, codec(wav))  # deterministic: the same input gives the same degraded input
    with pytest.raises(FileNotFoundError, match="no such folder"):
        CodecRoundTrip.from_pretrained(tiny_export["root"] / "nowhere")


def test_train_enhancer_on_missing_empty_or_all_bad_data_is_one_line(tmp_path, monkeypatch, capsys):
    """train.data missing, an empty folder, or a folder whose every clip is rejected (unreadable, too short, 3
    channels), or a missing train.codec_round_trip: one line naming the key, before any model or checkpoint
    folder exists."""
    import logging
    import signal

    (tmp_path / "empty").mkdir()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "garbage.wav").write_bytes(b"not audio at all")
    soundfile.write(bad / "short.wav", torch.zeros(480, 2).numpy(), 48000)
    soundfile.write(bad / "three.wav", torch.zeros(48000, 3).numpy(), 48000)
    good = tmp_path / "good"
    good.mkdir()
    soundfile.write(good / "a.wav", (0.1 * torch.randn(48000, 1)).numpy(), 48000)
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    handlers, level = logging.root.handlers[:], logging.root.level  # main configures the root logger
    try:
        main = load_example("train_enhancer").main  # installs Slurm signal handlers: restored below
        nope = tmp_path / "nope"
        for data, extra, why in (
                (nope, [], f"train.data={str(nope)!r}: no such file or folder"),
                (tmp_path / "empty", [], f"train.data={str(tmp_path / 'empty')!r}: holds no audio"),
                (bad, [], f"train.data={str(bad)!r}: no usable clip, all 3 rejected"),
                (good, [f"train.codec_round_trip={nope}"], f"train.codec_round_trip={str(nope)!r}: cannot load")):
            monkeypatch.setattr("sys.argv", ["train_enhancer.py", f"train.data={data}", *extra, "model.preset=tiny",
                                             f"output_dir={tmp_path / 'run'}", "hydra/job_logging=none",
                                             "hydra/hydra_logging=none"])  # Hydra's logging set-up stays out
            with pytest.raises(SystemExit) as refused:
                main()
            err = capsys.readouterr().err
            assert refused.value.code == 2 and "Traceback" not in err
            assert err.strip().splitlines()[-1].startswith(f"error: {why}"), err
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
        logging.root.handlers[:], logging.root.level = handlers, level
    assert not (tmp_path / "run" / "checkpoints").exists()
