"""Damaged checkpoints and safetensors files are named (issue 13, class 6): which file, what is wrong, what to do;
training resumes from the newest complete checkpoint, saying so. The damage is real: files of a real checkpoint
and HF folder truncated, removed or overwritten as a full disk or a cut copy leaves them."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest

from ualm_nemo.distributed.checkpoint_check import DamagedCheckpointError, find_resumable
from ualm_nemo.testing.examples import load_example
from ualm_nemo.testing.hf_folders import make_hf_folder


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


@pytest.fixture()
def run_root(tiny_export, tmp_path) -> Path:
    """A run's checkpoints: iter_0000001 complete, iter_0000002 (latest) complete until a test damages it."""
    root = tmp_path / "checkpoints"
    for step in (1, 2):
        shutil.copytree(tiny_export["ckpt"] / "iter_0000000", root / f"iter_{step:07d}")
    (root / "latest").write_text("iter_0000002")
    return root


DAMAGE = [("__0_0.distcp", _truncate, "__0_0.distcp: truncated"),
          ("common.pt", Path.unlink, "common.pt: missing"),
          ("ualm_common.pt", _truncate, "ualm_common.pt: unreadable"),
          (".metadata", _truncate, ".metadata: unreadable")]


@pytest.mark.parametrize("name,spoil,message", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_export_names_the_damaged_file_and_the_way_out(run_root, tmp_path, capsys, name, spoil, message):
    spoil(run_root / "iter_0000002" / name)
    assert load_example("convert_ualm_to_hf").main([str(run_root), str(tmp_path / "hf"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{run_root / 'iter_0000002'}/{message}" in err, err
    assert f"write 'iter_0000001' into {run_root / 'latest'}" in err
    assert not (tmp_path / "hf").exists()


def test_training_resumes_from_the_previous_complete_checkpoint(run_root, caplog):
    assert find_resumable(run_root) == run_root / "iter_0000002"
    _truncate(run_root / "iter_0000002" / "__0_0.distcp")
    with caplog.at_level(logging.WARNING):
        assert find_resumable(run_root) == run_root / "iter_0000001"
    assert "__0_0.distcp: truncated" in caplog.text and "resuming from the previous complete" in caplog.text
    (run_root / "iter_0000001" / "common.pt").unlink()
    with pytest.raises(DamagedCheckpointError, match="no older complete checkpoint exists; delete"):
        find_resumable(run_root)


def test_training_load_names_the_damaged_file(run_root):
    """The engine's load (what every rank runs on resume) checks before megatron reads anything."""
    from ualm_nemo.distributed.checkpoint import load_checkpoint

    (run_root / "iter_0000002" / "common.pt").write_bytes(b"\x80\x04 cut")
    with pytest.raises(DamagedCheckpointError, match=r"iter_0000002/common.pt: unreadable .*truncated or corrupt"):
        load_checkpoint(run_root / "iter_0000002", chunks=[])


def test_import_names_a_broken_safetensors_file(tmp_path, capsys):
    hf = make_hf_folder(tmp_path / "hf")
    shard = hf / "model-00003-of-00005.safetensors"
    _truncate(shard)
    out = str(tmp_path / "ckpt")
    assert load_example("convert_hf_to_ualm").main([str(hf), out, "--model", "tiny"]) == 2
    err = capsys.readouterr().err
    assert f"{shard}: not a valid safetensors file" in err and "truncated or corrupt" in err, err
    shard.write_bytes(b"\xff" * 64)  # garbage, header size included
    assert load_example("convert_hf_to_ualm").main([str(hf), out, "--model", "tiny"]) == 2
    assert f"{shard}: not a valid safetensors file" in capsys.readouterr().err
    assert not Path(out).exists()


def test_a_broken_audio_safetensors_of_an_export_is_named(tiny_export, tmp_path):
    import shutil

    from ualm_nemo.inference.hf_model import UALMForConditionalGeneration

    hf = shutil.copytree(tiny_export["hf"], tmp_path / "hf")
    audio = hf / "audio.safetensors"
    audio.write_bytes(audio.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"audio\.safetensors: not a valid safetensors file .* truncated or corrupt"):
        UALMForConditionalGeneration.from_pretrained(hf)


def test_a_truncated_model_safetensors_of_an_export_is_one_line(tiny_export, tmp_path, capsys):
    """Cut inside the data (an interrupted copy) or inside the header: the import command and the loader behind
    generate / chat / evaluate each say which file, in one line."""
    from ualm_nemo.inference.hf_model import UALMForConditionalGeneration

    hf = shutil.copytree(tiny_export["hf"], tmp_path / "hf")
    model = hf / "model.safetensors"
    whole = model.read_bytes()
    for cut in (whole[:-50], whole[:100]):
        model.write_bytes(cut)
        with pytest.raises(ValueError, match=r"model\.safetensors: not a valid safetensors file .* truncated"):
            UALMForConditionalGeneration.from_pretrained(hf)
        argv = ["--checkpoint", str(hf), "--codec", str(tiny_export["codec"]), "--caption", "rain", "--out-dir",
                str(tmp_path / "gen"), "--no-progress"]
        with pytest.raises(SystemExit) as refused:
            load_example("generate").main(argv)
        err = capsys.readouterr().err
        assert refused.value.code == 2 and "Traceback" not in err
        assert f"--checkpoint: cannot load: {model}: not a valid safetensors file" in err.strip().splitlines()[-1]
        assert load_example("convert_hf_to_ualm").main([str(hf), str(tmp_path / "ckpt"), "--no-progress"]) == 2
        assert f"{model}: not a valid safetensors file" in capsys.readouterr().err
