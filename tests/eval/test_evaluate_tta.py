"""examples/evaluate.py tta end to end on tiny sets with random-weight metric models saved as local files: a
generate.py folder scored with every metric plus the ground-truth row; a CFG sweep generated with the tiny
exported UALM (resumed); bad input refused or counted, never a silently smaller denominator."""

from __future__ import annotations

import json

import pytest
import soundfile

from ualm_nemo.eval.checkpoints import sha256
from ualm_nemo.testing.eval_sets import write_clip
from ualm_nemo.testing.examples import load_example

MODEL_FLAGS = ("openl3", "passt", "panns", "clap", "aes")


def _model_args(paths, names=MODEL_FLAGS):
    args = [a for n in names for a in (f"--{n}", str(paths[n]))]
    return args + (["--clap-tokenizer", str(paths["clap_tokenizer"])] if "clap" in names else [])


def _eval_set(tmp_path, ids=("a", "b"), reference=True):
    (tmp_path / "ref").mkdir(exist_ok=True)
    lines = []
    for k, item in enumerate(ids):
        if reference:
            write_clip(tmp_path / "ref" / f"{item}.wav", 1.0 + 0.5 * k, 44100, channels=2, freq=300 + 200 * k, seed=k)
        lines.append({"id": item, "caption": f"a tone at {300 + 200 * k} hertz", "audio": f"ref/{item}.wav"})
    path = tmp_path / "set.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path, lines


def _generated(tmp_path, lines, junk=()):
    folder = tmp_path / "gen"
    folder.mkdir()
    for k, line in enumerate(lines):
        if line["id"] in junk:
            (folder / f"{line['id']}.wav").write_bytes(b"RIFF not really")
        else:
            write_clip(folder / f"{line['id']}.wav", 1.2, 16000, freq=350 + 150 * k, seed=10 + k)
    (folder / "manifest.jsonl").write_text("".join(
        json.dumps({"id": line["id"], "caption": line["caption"], "seed": k, "audio": f"{line['id']}.wav"}) + "\n"
        for k, line in enumerate(lines)))
    return folder


@pytest.mark.slow
def test_generated_folder_scored_with_every_metric_and_the_ground_truth_row(tmp_path, metric_models, capsys):
    data, lines = _eval_set(tmp_path)
    gen, out = _generated(tmp_path, lines), tmp_path / "out"
    argv = ["tta", "--generated", str(gen), "--data", str(data), "--reference", "--device", "cpu",
            "--out-dir", str(out), "--no-progress", *_model_args(metric_models)]
    assert load_example("evaluate").main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    generated, truth = report["rows"]
    assert generated["name"] == "gen" and truth["name"] == "ground truth"
    for key in ("fd_openl3", "kl_passt", "is_panns", "is_panns_std", "fd_panns", "clap", "aes_CE", "aes_CU",
                "aes_PC", "aes_PQ"):
        assert isinstance(generated["metrics"][key], float), key
    assert generated["metrics"]["fd_openl3"] > 0 and generated["metrics"]["kl_passt"] > 0
    assert generated["used"]["fd_openl3"] == {"generated_clips": 2, "reference_clips": 2, "generated_frames": 6,
                                              "reference_frames": 5}  # 1.2 s: 3 windows; 1 s: 2, 1.5 s: 3
    assert generated["used"]["kl_passt"] == {"pairs": 2, "direction": "gen||ref"}
    assert generated["used"]["is_panns"] == {"clips": 2, "splits": 2}
    assert set(generated["items"]["a"]) == {"kl_passt", "clap", "aes_CE", "aes_CU", "aes_PC", "aes_PQ"}
    mean_kl = sum(generated["items"][i]["kl_passt"] for i in "ab") / 2
    assert generated["metrics"]["kl_passt"] == pytest.approx(mean_kl)
    assert truth["metrics"]["fd_openl3"] is None and isinstance(truth["metrics"]["clap"], float)
    assert truth["metrics"]["clap"] != generated["metrics"]["clap"]
    assert report["metric_models"]["panns"]["sha256"] == sha256(metric_models["panns"])
    assert set(report["metric_models"]) == set(MODEL_FLAGS)
    assert report["protocols"]["kl_passt"]["direction"] == "gen||ref" and report["items"] == 2
    table = (out / "report.md").read_text()
    assert "| gen |" in table and "| ground truth |" in table and "2 / 2" in table and "FD_openl3" in table
    assert "report.json" in capsys.readouterr().out


def test_bad_input_is_refused_or_counted(tmp_path, metric_models, capsys):
    cheap = ["--metrics", "is_panns,fd_panns", "--device", "cpu", "--no-progress", *_model_args(metric_models,
                                                                                                 ["panns"])]
    data, lines = _eval_set(tmp_path)
    gen = _generated(tmp_path, lines, junk=("b",))
    evaluate = load_example("evaluate")

    def refused(argv, message):
        with pytest.raises(SystemExit):
            evaluate.main(["tta", *argv])
        assert message in capsys.readouterr().err

    refused(["--generated", str(gen), "--data", str(data), "--out-dir", str(tmp_path / "x"), "--metrics", "clap",
             "--clap", str(tmp_path / "nowhere.pt")], "nowhere.pt: no such checkpoint file")
    refused(["--generated", str(gen), "--out-dir", str(tmp_path / "x"), "--metrics", "aes"],
            "--aes: no checkpoint given")
    assert not (tmp_path / "x").exists()
    (tmp_path / "empty.jsonl").write_text("")
    refused(["--generated", str(gen), "--data", str(tmp_path / "empty.jsonl"), *cheap], "no captions")
    (tmp_path / "other").mkdir()
    other, _ = _eval_set(tmp_path / "other", ids=("a", "c"), reference=False)
    refused(["--generated", str(gen), "--data", str(other), *cheap], "generated and reference ids differ")
    refused(["--generated", str(tmp_path), "--data", str(data), *cheap], "no manifest.jsonl")

    out = tmp_path / "out"
    assert evaluate.main(["tta", "--generated", str(gen), "--data", str(data), "--out-dir", str(out), *cheap]) == 0
    row = json.loads((out / "report.json").read_text())["rows"][0]
    assert list(row["unreadable"]) == ["b"] and "b.wav" in row["unreadable"]["b"]
    assert row["clips"] == 2 and row["used"]["is_panns"] == {"clips": 1, "splits": 1}
    assert row["used"]["fd_panns"]["generated_clips"] == 1 and row["metrics"]["fd_panns"] is None  # needs 2
    assert "1 / 2" in (out / "report.md").read_text()
    for line in lines:
        (tmp_path / "ref" / f"{line['id']}.wav").write_bytes(b"broken")
    refused(["--generated", str(gen), "--data", str(data), *cheap], "none of the 2 reference clips can be read")


@pytest.mark.slow
def test_cfg_sweep_generated_with_the_tiny_model_and_resumed(tiny_export, tmp_path, metric_models, capsys):
    lines = [{"id": f"t{k}", "caption": f"tone {k}", "audio": str(tiny_export["tone"])} for k in range(2)]
    data, out = tmp_path / "set.jsonl", tmp_path / "out"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    argv = ["tta", "--checkpoint", str(tiny_export["hf"]), "--codec", str(tiny_export["codec"]), "--data", str(data),
            "--cfg", "1,2", "--max-frames", "6", "--reference", "--metrics", "is_panns,fd_panns", "--device", "cpu",
            "--batch-size", "2", "--out-dir", str(out), "--no-progress", *_model_args(metric_models, ["panns"])]
    evaluate = load_example("evaluate")
    assert evaluate.main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert [(r["name"], r["cfg"]) for r in report["rows"]] == [("cfg=1", 1.0), ("cfg=2", 2.0), ("ground truth", None)]
    assert all(isinstance(r["metrics"]["is_panns"], float) for r in report["rows"])
    assert report["rows"][0]["metrics"]["fd_panns"] is not None and report["rows"][2]["metrics"]["fd_panns"] is None
    assert (out / "metric_vs_cfg.png").stat().st_size > 1000
    manifests = [(out / f"cfg{c}" / "manifest.jsonl").read_text() for c in (1, 2)]
    assert all(len(m.splitlines()) == 2 for m in manifests)
    capsys.readouterr()
    assert evaluate.main(argv) == 0  # resumed: nothing generated again, the same figures
    assert "resuming" in capsys.readouterr().out
    assert [(out / f"cfg{c}" / "manifest.jsonl").read_text() for c in (1, 2)] == manifests
    assert json.loads((out / "report.json").read_text())["rows"] == report["rows"]


def test_random_metric_checkpoints_command_is_documented_and_scores(tmp_path, metric_models, capsys):
    """The session's metric models come from examples/make_random_metric_checkpoints.py: its note says they are
    random, and evaluate.py tta runs with the flags the note lists (as the README shows)."""
    note = (metric_models["aes"].parent / "RANDOM_WEIGHTS.txt").read_text()
    assert "RANDOM weights" in note and "meaningless" in note
    flags = note.strip().splitlines()[-1].split()
    assert flags == _model_args(metric_models)
    data, lines = _eval_set(tmp_path, reference=False)
    argv = ["tta", "--generated", str(_generated(tmp_path, lines)), "--data", str(data), "--metrics", "clap",
            "--device", "cpu", "--out-dir", str(tmp_path / "out"), "--no-progress", *flags]
    assert load_example("evaluate").main(argv) == 0
    metrics = json.loads((tmp_path / "out" / "report.json").read_text())["rows"][0]["metrics"]
    assert isinstance(metrics["clap"], float)
    refused = load_example("make_random_metric_checkpoints").main([str(metric_models["aes"].parent)])
    assert refused == 2 and "not empty" in capsys.readouterr().err  # never written over without --overwrite


def test_generation_through_the_enhancer_is_scored_and_reported_at_48k(tiny_export, tiny_enhancer, tmp_path,
                                                                       metric_models, capsys):
    """--checkpoint --enhancer: the clips are written at 48 kHz stereo (the PANNs metric resamples them), the
    report states the rate and channels each row scored; --enhancer without generating, or unloadable, is
    one line naming the flag."""
    lines = [{"id": f"t{k}", "caption": f"tone {k}", "audio": str(tiny_export["tone"])} for k in range(2)]
    data, out = tmp_path / "set.jsonl", tmp_path / "out"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    common = ["--data", str(data), "--metrics", "is_panns", "--device", "cpu", "--no-progress",
              *_model_args(metric_models, ["panns"])]
    argv = ["tta", "--checkpoint", str(tiny_export["hf"]), "--codec", str(tiny_export["codec"]), "--cfg", "2",
            "--max-frames", "6", "--reference", "--batch-size", "2", "--out-dir", str(out), *common]
    evaluate = load_example("evaluate")
    assert evaluate.main([*argv, "--enhancer", str(tiny_enhancer)]) == 0
    entries = [json.loads(line) for line in (out / "cfg2" / "manifest.jsonl").read_text().splitlines()]
    assert [e["sample_rate"] for e in entries] == [48000, 48000]
    assert all(e["enhancer"] == str(tiny_enhancer.resolve()) for e in entries)
    info = soundfile.info(str(out / "cfg2" / entries[0]["audio"]))
    assert (info.samplerate, info.channels) == (48000, 2)
    report = json.loads((out / "report.json").read_text())
    generated, truth = report["rows"]
    assert generated["audio"] == {"sample_rate": 48000, "channels": 2} and report["enhancer"] == entries[0]["enhancer"]
    assert truth["audio"] == {"sample_rate": 16000, "channels": 1}  # the reference tone as it is on disk
    assert isinstance(generated["metrics"]["is_panns"], float) and generated["used"]["is_panns"]["clips"] == 2
    table = (out / "report.md").read_text()
    assert "| cfg=2 | 48 kHz, 2 ch |" in table and "| ground truth | 16 kHz, 1 ch |" in table
    capsys.readouterr()
    with pytest.raises(SystemExit):  # the folder holds 48 kHz clips: generating it again without is refused
        evaluate.main(argv)
    assert "enhancer" in capsys.readouterr().err
    for bad, words in (([*argv, "--out-dir", str(tmp_path / "x"), "--enhancer", str(tmp_path / "nope")],
                        "--enhancer: cannot load"),
                       (["tta", "--generated", str(out / "cfg2"), "--enhancer", str(tiny_enhancer), *common],
                        "--enhancer enhances the clips it generates")):
        with pytest.raises(SystemExit):
            evaluate.main(bad)
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err
    assert not (tmp_path / "x" / "cfg2" / "manifest.jsonl").exists()
