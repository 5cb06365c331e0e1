"""Bad records through the real commands (issue 13, classes 1-2): the same manifests, holding NaN / inf audio,
NaN / inf numbers, a negative duration, non-UTF-8 bytes and a duplicate id next to good records, go through
``examples/prepare_data.py`` and through the manifest training path's data set-up. Each bad record is one
counted reject named by file:line (or [index]) with its reason; every good record is still there; no source
aborts. The reader tests (test_synthetic_raw.py) cover each kind's wording; this file covers the commands."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import soundfile as sf

from ualm_nemo.testing.examples import load_example

CONV = [{"from": "human", "value": "<sound>\nWhat is it?"}, {"from": "gpt", "value": "A tone."}]
TTA_BAD = {2: "non-finite samples", 3: "non-finite samples", 4: "'start_time' is nan", 5: "'end_time' is inf",
           6: "'duration' = -1.0 is not positive", 7: "not UTF-8"}  # tta.jsonl line -> reason
TTA_GOOD = [("good.wav", 0.0), ("nan.wav", 0.5), ("good.wav", 0.5)]  # (file, start): the NaN is outside [0.5, 1)


def _tta(location: str, start: float = 0.0, end: float = 0.5, **kw) -> bytes:
    entry = {"location": location, "start_time": start, "end_time": end, "duration": end - start,
             "caption": f"{location} from {start}", "sample_rate": 16000, **kw}
    return json.dumps(entry).encode()


@pytest.fixture()
def manifests(tmp_path):
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)).astype(np.float32)
    sf.write(str(tmp_path / "good.wav"), tone, 16000, subtype="FLOAT")
    bad = tone.copy()
    bad[4000] = np.nan  # at 0.25 s
    sf.write(str(tmp_path / "nan.wav"), bad, 16000, subtype="FLOAT")
    bad[4000] = np.inf
    sf.write(str(tmp_path / "inf.wav"), bad, 16000, subtype="FLOAT")
    tta = [_tta("good.wav"), _tta("nan.wav"), _tta("inf.wav"),
           _tta("good.wav").replace(b'"start_time": 0.0', b'"start_time": NaN'),
           _tta("good.wav").replace(b'"end_time": 0.5', b'"end_time": Infinity'),
           _tta("good.wav", duration=-1.0), _tta("good.wav").replace(b'"caption": "good.wav', b'"caption": "caf\xe9'),
           _tta("nan.wav", 0.5, 1.0), _tta("good.wav", 0.5, 1.0)]
    (tmp_path / "tta.jsonl").write_bytes(b"\n".join(tta) + b"\n")
    und = [{"id": "a", "sound": "good.wav", "conversations": CONV}, {"id": "a", "sound": "good.wav",
           "conversations": CONV}, {"id": "b", "sound": "nan.wav", "conversations": CONV},
           {"id": "c", "sound": "good.wav", "duration": float("inf"), "conversations": CONV},
           {"id": "d", "sound": "good.wav", "conversations": CONV}]
    (tmp_path / "und.json").write_text(json.dumps(und))  # json.dumps writes the inf as Infinity
    text = [json.dumps({"input": [{"role": "user", "content": "1+1?"}], "output": "2"}).encode(),
            json.dumps({"input": [{"role": "user", "content": "hi"}], "output": "x"}).encode().replace(b"x", b"\xff"),
            json.dumps({"input": [{"role": "user", "content": "hi"}], "output": "hello"}).encode()]
    (tmp_path / "text.jsonl").write_bytes(b"\n".join(text) + b"\n")
    return tmp_path


def test_prepare_command_counts_every_bad_record_and_keeps_every_good_one(manifests, monkeypatch, capsys):
    out = manifests / "prep"
    monkeypatch.setattr("sys.argv", ["prepare_data.py", "--out", str(out),
                                     "--source", f"t=tta:{manifests / 'tta.jsonl'}",
                                     "--source", f"u=understanding:{manifests / 'und.json'}",
                                     "--source", f"x=text:{manifests / 'text.jsonl'}"])
    with pytest.raises(SystemExit) as done:
        load_example("prepare_data").main()
    assert done.value.code == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"cuts": 3 + 2 + 2, "rejects": 6 + 3 + 1}

    def listed(name: str) -> tuple[list[dict], list[dict], dict]:
        with gzip.open(out / name / "cuts.jsonl.gz", "rt") as f:
            cuts = [json.loads(line)["custom"] for line in f]
        rejects = [json.loads(x) for x in (out / name / "rejects.jsonl").read_text().splitlines()]
        return cuts, rejects, json.loads((out / name / "summary.json").read_text())

    cuts, rejects, summary = listed("t")
    assert (summary["num_records"], summary["num_rejects"]) == (3, 6)  # + 6 = the 9 lines
    assert [r["source"] for r in rejects] == [f"tta.jsonl:{line}" for line in TTA_BAD]
    for reject, words in zip(rejects, TTA_BAD.values()):
        assert words in reject["reason"], reject
    assert [c["caption"] for c in cuts] == [f"{f} from {s}" for f, s in TTA_GOOD]

    cuts, rejects, summary = listed("u")
    assert (summary["num_records"], summary["num_rejects"]) == (2, 3)
    assert [(r["source"], r["reason"].split(" (")[0].split(":")[0]) for r in rejects] == [
        ("und.json[1]", "duplicate id 'a'"), ("und.json[2]", "non-finite samples"),
        ("und.json[3]", "field 'duration' is inf, not a finite number")]
    assert [c["origin"] for c in cuts] == ["a", "d"]  # the first "a" kept

    cuts, rejects, summary = listed("x")
    assert (summary["num_records"], summary["num_rejects"]) == (2, 1)
    assert rejects[0]["source"] == "text.jsonl:2" and "not UTF-8" in rejects[0]["reason"]


def test_manifest_training_rejects_the_same_records_and_keeps_the_rest(manifests):
    """The in-memory manifest path (train.py with data.*_manifest) reads through the same readers: a NaN clip
    never reaches a batch (it used to turn whole steps into skipped NaN losses without naming the clip)."""
    import torch

    from ualm_nemo.training.data_setup import build_train_dataset
    from ualm_nemo.model.config import UALMConfig
    from ualm_nemo.training.run_config import DataConfig

    data = DataConfig(synthesize=False, tta_manifest=str(manifests / "tta.jsonl"),
                      understanding_manifest=str(manifests / "und.json"), text_manifest=str(manifests / "text.jsonl"))
    dataset, rejects = build_train_dataset(data, UALMConfig.from_dict({}), manifests / "out")
    assert sorted(r.source for r in rejects) == sorted(
        [f"tta.jsonl:{line}" for line in TTA_BAD] + ["und.json[1]", "und.json[2]", "und.json[3]", "text.jsonl:2"])
    assert [r.source for r in dataset.records] == ["tta.jsonl:1", "tta.jsonl:8", "tta.jsonl:9", "und.json[0]",
                                                   "und.json[4]", "text.jsonl:1", "text.jsonl:3"]
    for i in range(len(dataset)):  # every good sample is finite
        sample = dataset[i]
        assert all(torch.isfinite(v).all() for v in sample.values() if torch.is_tensor(v) and v.is_floating_point())
