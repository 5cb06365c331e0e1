"""Wrong inputs to the converters fail early with a message naming the problem; outputs are never half-written.

Everything here runs in the test process: the CLIs do all their checks before any process group or model
exists, so a wrong input costs no model build (and these tests no process start).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ualm_nemo.testing.examples import load_example
from ualm_nemo.testing.hf_folders import make_hf_folder


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> Path:
    return make_hf_folder(tmp_path_factory.mktemp("errors") / "hf")


@pytest.fixture()
def fails(capsys):
    """Run a CLI's main(argv); assert exit code 2 and return its stderr."""
    def run(cli: str, argv: list[str]) -> str:
        assert load_example(cli).main(argv) == 2
        return capsys.readouterr().err
    return run


def _copy(hf: Path, dst: Path) -> Path:
    shutil.copytree(hf, dst)
    return dst


def test_import_rejects_bad_inputs(hf, tmp_path, fails):
    out = str(tmp_path / "ckpt")
    assert "HF folder /nope does not exist" in fails("convert_hf_to_ualm", ["/nope", out, "--model", "tiny"])
    no_config = _copy(hf, tmp_path / "no_config")
    (no_config / "config.json").unlink()
    assert "has no config.json" in fails("convert_hf_to_ualm", [str(no_config), out, "--model", "tiny"])
    no_shard = _copy(hf, tmp_path / "no_shard")
    (no_shard / "model-00002-of-00005.safetensors").unlink()
    assert "lists the shard model-00002-of-00005.safetensors, which is missing" in \
        fails("convert_hf_to_ualm", [str(no_shard), out, "--model", "tiny"])
    # the HF config disagrees with the UALM config: every differing field is named
    err = fails("convert_hf_to_ualm", [str(hf), out, "--set", "backbone.num_query_groups=4"])
    assert "num_key_value_heads: HF 2 != UALM 4 (model.backbone.num_query_groups)" in err
    assert "hidden_size: HF 64 != UALM 128" in fails("convert_hf_to_ualm", [str(hf), out, "--model", "tiny",
                                                                              "--set", "backbone={base: tiny, hidden_size: 128}"])
    # a tensor whose shape disagrees with config.json
    from safetensors.torch import load_file, save_file

    bad = _copy(hf, tmp_path / "bad_shape")
    index = json.loads((bad / "model.safetensors.index.json").read_text())["weight_map"]
    shard = bad / index["model.layers.2.self_attn.k_proj.weight"]
    tensors = load_file(shard)
    tensors["model.layers.2.self_attn.k_proj.weight"] = torch.zeros(48, 64)
    save_file(tensors, shard, metadata={"format": "pt"})
    assert "'model.layers.2.self_attn.k_proj.weight': shape (48, 64) does not match the expected (32, 64)" in \
        fails("convert_hf_to_ualm", [str(bad), out, "--model", "tiny"])
    # a layout that does not divide the model
    assert "tensor_model_parallel_size=3 does not divide num_attention_heads=4" in \
        fails("convert_hf_to_ualm", [str(hf), out, "--model", "tiny", "--tensor-parallel", "3"])
    assert "pipeline_model_parallel_size=3 does not divide num_layers=4" in \
        fails("convert_hf_to_ualm", [str(hf), out, "--model", "tiny", "--pipeline-parallel", "3"])
    assert "model config 'huge' is neither a file nor one of" in \
        fails("convert_hf_to_ualm", [str(hf), out, "--model", "huge"])
    assert "model.audio_in.encoder_path is not set" in fails("convert_hf_to_ualm", [str(hf), out, "--model", "qwen2.5-0.5b"])
    assert not (tmp_path / "ckpt").exists()


def test_export_rejects_bad_inputs(tmp_path, fails, tiny_export):
    out = str(tmp_path / "out")
    assert "checkpoint /nope does not exist" in fails("convert_ualm_to_hf", ["/nope", out])
    interrupted = tmp_path / "run"
    (interrupted / "iter_0000010.tmp").mkdir(parents=True)
    assert "an interrupted save leaves only *.tmp folders" in fails("convert_ualm_to_hf", [str(interrupted), out])
    bare = tmp_path / "bare" / "iter_0000003"  # a complete checkpoint whose ualm_common.pt holds no model config
    shutil.copytree(tiny_export["ckpt"] / "iter_0000000", bare)
    torch.save({"step": 3}, bare / "ualm_common.pt")
    assert "records no model config: give one (--model" in fails("convert_ualm_to_hf", [str(bare), out])
    assert "max shard size '5 parsecs'" in fails("convert_ualm_to_hf", [str(bare), out, "--model", "tiny",
                                                                       "--max-shard-size", "5 parsecs"])
    assert "tokenizer folder /nope does not exist" in fails("convert_ualm_to_hf", [str(bare), out, "--model", "tiny",
                                                                                   "--tokenizer", "/nope"])
    Path(out).mkdir()
    assert f"output {out} already exists" in fails("convert_ualm_to_hf", [str(bare), out, "--model", "tiny"])


def test_ualm_class_needs_a_ualm_export(hf):
    from ualm_nemo.inference.hf_model import UALMForConditionalGeneration

    with pytest.raises(FileNotFoundError, match="is not a UALM export: no ualm_config.json"):
        UALMForConditionalGeneration.from_pretrained(hf)


def test_sharded_writer_and_atomic_folder(tmp_path):
    from ualm_nemo.convert.hf_folder import HFFolder, ShardedWriter, atomic_folder

    tensors = {f"w{i}": torch.full((10, 10), float(i)) for i in range(5)}  # 400 bytes each
    with atomic_folder(tmp_path / "out") as tmp:
        (tmp / "config.json").write_text("{}")
        writer = ShardedWriter(tmp, max_shard_bytes=1000)
        for key, value in tensors.items():
            writer.add(key, value)
        with pytest.raises(ValueError, match="'w1' written twice"):
            writer.add("w1", tensors["w1"])
        assert writer.finish() == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    folder = HFFolder(tmp_path / "out")
    assert sorted(folder.keys()) == sorted(tensors)
    assert all(torch.equal(folder.get(k), v) for k, v in tensors.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # a failure inside leaves the previous folder untouched and no temporary folder
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_folder(tmp_path / "out", overwrite=True) as tmp:
            (tmp / "config.json").write_text('{"half": true}')
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (tmp_path / "out" / "config.json").read_text() == "{}"
    with pytest.raises(FileExistsError, match="already exists"):
        with atomic_folder(tmp_path / "out"):
            pass


@pytest.mark.parametrize("reserve", [None, 64])  # 64 bytes: the header does not fit, the shard is rewritten
def test_streamed_shards_read_by_safetensors(tmp_path, monkeypatch, reserve):
    """The streaming writer's files are plain safetensors (mixed dtypes, empty and 0-d tensors included)."""
    from safetensors import safe_open

    from ualm_nemo.convert import hf_folder

    if reserve is not None:
        monkeypatch.setattr(hf_folder, "HEADER_RESERVE", reserve)
    g = torch.Generator().manual_seed(0)
    tensors = {"a.bf16": torch.randn(33, 7, generator=g).to(torch.bfloat16), "b.f32": torch.randn(5, generator=g),
               "c.empty": torch.zeros(0, 4), "d.scalar": torch.tensor(3.5, dtype=torch.float16),
               "e.int": torch.arange(6).reshape(2, 3), "f.view": torch.randn(8, 8, generator=g)[2:5]}
    writer = hf_folder.ShardedWriter(tmp_path, max_shard_bytes=10**9)
    for key, value in tensors.items():
        writer.add(key, value)
    assert writer.finish() == ["model.safetensors"]
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        for key, value in tensors.items():
            got = f.get_tensor(key)
            assert got.dtype == value.dtype and torch.equal(got, value), key
    (tmp_path / "config.json").write_text("{}")
    folder = hf_folder.HFFolder(tmp_path)
    for key, value in tensors.items():
        got = folder.get(key)
        assert got.dtype == value.dtype and torch.equal(got, value), key
