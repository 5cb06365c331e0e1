"""Records too long for the model (issue 13, class 3): the manifest training path applies ``data.seq_len`` like the
Shar path (skipped before any audio is encoded, each named by file:line), and prepare's ``--max-duration``."""

from __future__ import annotations

import json
import random
import time

import numpy as np
import pytest
import soundfile as sf

from ualm_nemo.data.cuts import read_manifest
from ualm_nemo.data.formatting import SampleFormatter
from ualm_nemo.data.length_limit import record_length
from ualm_nemo.data.tokenizer import build_tokenizer
from ualm_nemo.testing.examples import load_example
from ualm_nemo.training.data_setup import build_train_dataset
from ualm_nemo.model.config import UALMConfig
from ualm_nemo.training.run_config import DataConfig

SEQ_LEN = 400
CONV = [{"from": "human", "value": "<sound>\nWhat is it?"}, {"from": "gpt", "value": "A tone."}]


def _wav(path, seconds, sr=16000, channels=1):
    x = (0.3 * np.sin(2 * np.pi * 440 * np.arange(round(seconds * sr)) / sr)).astype(np.float32)
    sf.write(str(path), np.stack([x, -x], 1) if channels == 2 else x, sr)


def _tta(location, end, caption="a tone", sr=16000):
    return json.dumps({"location": location, "start_time": 0.0, "end_time": end, "duration": end,
                       "caption": caption, "sample_rate": sr})


@pytest.fixture()
def manifests(tmp_path):
    """Each task: good records of several lengths (resampled and stereo too) and records too long for SEQ_LEN."""
    _wav(tmp_path / "short.wav", 1.0)
    _wav(tmp_path / "long.wav", 12.0)  # 600 codec frames: over SEQ_LEN as a TTA target
    _wav(tmp_path / "st44k.wav", 1.3, sr=44100, channels=2)
    tta = [_tta("short.wav", 1.0), _tta("short.wav", 0.77), _tta("long.wav", 12.0),
           _tta("short.wav", 0.5, caption="x" * 100_000), _tta("st44k.wav", 1.21, sr=44100)]
    (tmp_path / "tta.jsonl").write_text("\n".join(tta) + "\n")
    und = [{"id": "a", "sound": "short.wav", "conversations": CONV}, {"id": "b", "sound": "st44k.wav",
           "conversations": CONV}, {"id": "c", "sound": "long.wav", "conversations": CONV},  # 300 frames: fits
           {"id": "d", "sound": "short.wav", "conversations": [CONV[0], {"from": "gpt", "value": "y" * 5000}]}]
    (tmp_path / "und.json").write_text(json.dumps(und))
    text = [json.dumps({"input": [{"role": "user", "content": "1+1?"}], "output": "2"}),
            json.dumps({"input": [{"role": "user", "content": "q" * 100_000}], "output": "a"}),
            json.dumps({"input": [{"role": "user", "content": "hi"}], "output": "hello"})]
    (tmp_path / "text.jsonl").write_text("\n".join(text) + "\n")
    return tmp_path


def test_record_length_is_the_formatted_length(manifests):
    """The limit is decided without encoding: its length must be exactly the sample's (codes of that length)."""
    import torch

    from ualm_nemo.codec.xcodec import num_codec_frames
    from ualm_nemo.data.raw import load_audio

    fmt = SampleFormatter.from_config(build_tokenizer("byte"), UALMConfig.from_dict({}))
    checked = 0
    for task, name in (("tta", "tta.jsonl"), ("understanding", "und.json"), ("text", "text.jsonl")):
        for record in read_manifest(task, manifests / name).records:
            if task == "tta":
                wav = load_audio(record.audio_path, record.start, record.end)
                codes = torch.zeros(num_codec_frames(wav.shape[0]), 8, dtype=torch.long)
                sample = fmt.format(record, random.Random(0), codes=codes)
            elif task == "understanding":
                sample = fmt.format(record, random.Random(0), waveform=load_audio(record.audio_path))
            else:
                sample = fmt.format(record, random.Random(0))
            assert record_length(record, fmt) == sample["tokens"].shape[0], record.source
            checked += 1
    assert checked == 12


def test_manifest_training_skips_overlong_records_by_source(manifests, caplog):
    data = DataConfig(tta_manifest=str(manifests / "tta.jsonl"), understanding_manifest=str(manifests / "und.json"),
                      text_manifest=str(manifests / "text.jsonl"), seq_len=SEQ_LEN)
    t0 = time.perf_counter()
    dataset, rejects = build_train_dataset(data, UALMConfig.from_dict({}), manifests / "out")
    assert time.perf_counter() - t0 < 60  # no batch of 100k positions was ever built
    assert sorted(r.source for r in rejects) == ["text.jsonl:2", "tta.jsonl:3", "tta.jsonl:4", "und.json[3]"]
    assert all(f"longer than data.seq_len={SEQ_LEN}" in r.reason for r in rejects)
    assert "tta.jsonl:4" in caplog.text and "skipped 4 of 12" in caplog.text
    # every good record is still there, in order, and fits
    assert [r.source for r in dataset.records] == ["tta.jsonl:1", "tta.jsonl:2", "tta.jsonl:5", "und.json[0]",
                                                   "und.json[1]", "und.json[2]", "text.jsonl:1", "text.jsonl:3"]
    lengths = [dataset[i]["tokens"].shape[0] for i in range(len(dataset))]
    assert max(lengths) <= SEQ_LEN and max(lengths) > SEQ_LEN // 2  # und.json[2] (12 s) is long but fits


def test_shar_path_names_the_skipped_samples(shar_sources, caplog):
    from ualm_nemo.data.shar_dataset import SharBatchLoader, SharLoaderConfig

    cfg = SharLoaderConfig(sources=[{"name": "und", "shar_dir": shar_sources["understanding"]}], window_size=8,
                           max_tokens=512, seq_len=125, seed=1)  # the 8 clips' samples: 89..163 positions
    fmt = SampleFormatter.from_config(build_tokenizer("byte"), UALMConfig.from_dict({}))
    batch = next(iter(SharBatchLoader(cfg, fmt)))  # window 0 holds the source's 8 samples once
    assert "skipped 4 samples longer than 125 positions" in caplog.text
    assert caplog.text.count("und/understanding-000000") == 4 and batch.tokens.shape[1] <= 125


def test_prepare_max_duration_rejects_long_audio(manifests, capsys, monkeypatch):
    prepare = load_example("prepare_data")
    out = manifests / "prep"
    argv = ["prepare_data.py", "--out", str(out), "--source", f"t=tta:{manifests / 'tta.jsonl'}",
            "--source", f"u=understanding:{manifests / 'und.json'}", "--max-duration", "5"]
    monkeypatch.setattr("sys.argv", argv)
    with pytest.raises(SystemExit) as done:
        prepare.main()
    assert done.value.code == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"cuts": 7, "rejects": 2}
    rejects = [json.loads(x) for x in (out / "t" / "rejects.jsonl").read_text().splitlines()]
    assert rejects == [{"source": "tta.jsonl:3", "reason": "duration 12.000 s is longer than --max-duration 5 s"}]
    assert json.loads((out / "u" / "rejects.jsonl").read_text())["source"] == "und.json[2]"
    ids = [json.loads(x)["id"] for x in __import__("gzip").open(out / "t" / "cuts.jsonl.gz", "rt")]
    assert ids == ["t-00000000", "t-00000001", "t-00000003", "t-00000004"]  # ids do not depend on the limit

    for bad in ("0", "-3", "nan", "abc"):
        monkeypatch.setattr("sys.argv", argv[:-1] + [bad])
        with pytest.raises(SystemExit) as refused:
            prepare.main()
        assert refused.value.code == 2
        assert "argument --max-duration" in capsys.readouterr().err
