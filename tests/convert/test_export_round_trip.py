"""A UALM export imports whole: UALM -> HF -> UALM -> HF is bit-exact, audio parts included (audio rows, stream
heads, adapter, tower), and an export whose audio.safetensors does not fit is refused with one line, never
imported text-only. The first UALM checkpoint and HF folder are the suite's tiny export (tests/conftest.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ualm_nemo.testing.dist import run_distributed
from ualm_nemo.testing.examples import load_example

pytestmark = pytest.mark.timeout(300)


def _checkpoint_tensors_differ(first: Path, second: Path) -> list[str]:
    """Keys whose tensors differ between two checkpoints of the same model (each read tensor by tensor)."""
    from ualm_nemo.distributed import checkpoint
    from ualm_nemo.distributed.parallel import init_model_parallel
    from ualm_nemo.distributed.streaming import StreamedCheckpointReader
    from ualm_nemo.model.builder import build_model

    iterations = [checkpoint.find_latest(p) for p in (first, second)]
    cfg = checkpoint.stored_model_config(iterations[0]).without_training_features()
    init_model_parallel(cfg.parallel, seed=0)
    skeleton = build_model(cfg, initialize=False, device="cpu")
    a, b = (StreamedCheckpointReader(skeleton, it) for it in iterations)
    assert sorted(a.keys()) == sorted(b.keys())
    return [k for k in a.keys() if not torch.equal(a.get(k), b.get(k))]


def _round_trip(root: str, ckpt: str, hf: str) -> dict:
    """Import the export and export that again; export a run that recorded ``data.tokenizer=byte``."""
    r = Path(root)
    hf2u, u2hf = load_example("convert_hf_to_ualm"), load_example("convert_ualm_to_hf")
    rcs = (hf2u.main([hf, str(r / "ckpt2"), "--no-progress"]),
           u2hf.main([str(r / "ckpt2"), str(r / "hf2"), "--no-progress"]))
    shutil.copytree(ckpt, r / "byte_run")  # what training now records beside the weights
    common_file = next((r / "byte_run").glob("iter_*/ualm_common.pt"))
    common = torch.load(common_file, weights_only=False)
    del common["imported_from"]
    torch.save({**common, "tokenizer": "byte"}, common_file)
    rc_byte = u2hf.main([str(r / "byte_run"), str(r / "hf_byte"), "--no-progress"])
    return {"rc": rcs, "rc_byte": rc_byte, "differ": _checkpoint_tensors_differ(Path(ckpt), r / "ckpt2")}


@pytest.fixture(scope="module")
def round_trip(tiny_export, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("round_trip")
    out = run_distributed(1, _round_trip, str(root), str(tiny_export["ckpt"]), str(tiny_export["hf"]))[0]
    return {**out, "root": root}


def _files(folder: Path, pattern: str) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(pattern))


def test_export_round_trip_is_bit_exact_with_audio(tiny_export, round_trip):
    assert round_trip["rc"] == (0, 0)
    assert round_trip["differ"] == []  # every tensor of the re-imported checkpoint: audio rows, heads, adapter, tower
    first, second = tiny_export["hf"], round_trip["root"] / "hf2"
    names = _files(first, "*.safetensors")
    assert "audio.safetensors" in names and "audio_encoder/model.safetensors" in names
    assert _files(second, "*.safetensors") == names
    for name in names:
        a, b = load_file(first / name), load_file(second / name)
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), name
    for name in ("config.json", "ualm_config.json", "audio_encoder/config.json"):
        assert json.loads((first / name).read_text()) == json.loads((second / name).read_text()), name


def _copy_export(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage, message", [
    ("drop_key", "head.stream_embedding missing"),
    ("wrong_shape", "embedding.audio (3, 64)"),
    ("extra_key", "adapter.fc9.weight not used by the config"),
    ("no_audio_file", "without audio.safetensors"),
    ("no_audio_input", "adapter.fc1.bias, adapter.fc1.weight not used by the config"),
])
def test_export_with_unusable_audio_parts_is_refused(tiny_export, tmp_path, capsys, damage, message):
    folder = _copy_export(tiny_export["hf"], tmp_path / "hf")
    parts = load_file(folder / "audio.safetensors")
    extra = []
    if damage == "drop_key":
        del parts["head.stream_embedding"]
    elif damage == "wrong_shape":
        parts["embedding.audio"] = parts["embedding.audio"][:3].clone()
    elif damage == "extra_key":
        parts["adapter.fc9.weight"] = torch.zeros(2, 2)
    elif damage == "no_audio_input":
        extra = ["--no-audio-input"]
    save_file(parts, folder / "audio.safetensors")
    if damage == "no_audio_file":
        (folder / "audio.safetensors").unlink()
    rc = load_example("convert_hf_to_ualm").main([str(folder), str(tmp_path / "ckpt"), "--no-progress", *extra])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in err, err
    assert not (tmp_path / "ckpt").exists()


def test_export_carries_the_run_tokenizer_and_evaluate_text_loads_it(round_trip, tmp_path):
    """A data.tokenizer=byte run (the demo's): the export holds a transformers tokenizer with the byte ids."""
    from transformers import AutoTokenizer

    from ualm_nemo.data.tokenizer import ByteChatTokenizer, HFTokenizer

    folder = round_trip["root"] / "hf_byte"
    assert round_trip["rc_byte"] == 0
    text = "Héllo, wörld 42!\n\t~"
    assert AutoTokenizer.from_pretrained(folder).encode(text, add_special_tokens=False) == \
        ByteChatTokenizer().encode(text)
    hf_tok = HFTokenizer(folder)
    assert (hf_tok.im_start_id, hf_tok.im_end_id, hf_tok.eos_ids) == (257, 258, ByteChatTokenizer().eos_ids)
    # evaluate.py text's loading path with no --tokenizer (the folder's own): its check, then lm_eval's HFLM
    from ualm_nemo.eval import text_bench, text_suite

    gsm = tmp_path / "gsm8k.jsonl"
    gsm.write_text(json.dumps({"question": "What is 1 + 1?", "answer": "#### 2"}) + "\n")
    text_suite.prepare(text_suite.TextSuiteArgs(hf=str(folder), gsm8k=str(gsm), gsm8k_shots=0,
                                                out_dir=str(tmp_path / "out")))
    lm = text_bench.build_lm(folder, folder, "float32", 1, "cpu")
    assert lm.tok_encode(text) == ByteChatTokenizer().encode(text) and lm.eot_token_id == 256
