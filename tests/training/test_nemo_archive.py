""".nemo archives through NeMo's own API: UALMModel.save_to -> UALMModel.restore_from gives the same logits (also
from TP2 shards into one process), and convert_ualm_to_hf on the archive writes the same tensors as on the
distributed checkpoint of the same model."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ualm_nemo.testing.dist import run_distributed
from ualm_nemo.testing.examples import load_example


def _run(output_dir: str, tp: int = 1):
    from ualm_nemo.training.run_config import run_config_from_dict

    return run_config_from_dict({
        "model": {"backbone": "tiny", "audio_in": {"random_encoder": True},
                  "parallel": {"tensor_model_parallel_size": tp}},
        "optim": {"lr": 1e-2, "warmup_steps": 0},
        "train": {"max_steps": 2, "global_batch_size": 2, "micro_batch_size": 2},
        "data": {"synthesize": True}, "output_dir": output_dir})


def _logits(chunk, batch) -> list[torch.Tensor]:
    """Every output tensor of one TP1/PP1 forward (text logits, codebook logits)."""
    chunk.eval()
    with torch.no_grad():
        out = chunk(**batch.model_inputs())
    return [t.detach().clone() for t in (out if isinstance(out, (tuple, list)) else [out])]


def _trained_model(root: Path, tp: int):
    """A UALMModel after one optimizer step (its weights differ from any initialisation)."""
    from ualm_nemo.distributed.parallel import init_model_parallel
    from ualm_nemo.testing.batches import random_batch
    from ualm_nemo.training.nemo_model import UALMModel

    run = _run(str(root / "run"), tp)
    init_model_parallel(run.model.parallel, seed=0)
    model = UALMModel(run)
    model.configure_model()
    batch = random_batch(run.model.vocab, 2, 3)
    model.engine.train_step([batch])
    return model, batch


def _save_restore(root: str) -> dict:
    from ualm_nemo.training.nemo_model import UALMModel

    root = Path(root)
    model, batch = _trained_model(root, tp=1)
    before = _logits(model.engine.chunks[0], batch)
    model.save_to(str(root / "ualm.nemo"))
    model.engine.save(str(root / "ckpt"), extra=model.archive_extra())  # the training checkpoint of the same model
    restored = UALMModel.restore_from(str(root / "ualm.nemo"))
    after = _logits(restored.engine.chunks[0], batch)
    config_only = UALMModel.restore_from(str(root / "ualm.nemo"), return_config=True)
    from lightning.pytorch import Trainer

    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    trainable = UALMModel.restore_from(str(root / "ualm.nemo"), trainer=trainer)
    # with a trainer: an optimizer over the loaded weights, whose first step starts from the archive's weights
    losses = [restored.engine.eval_loss([batch]), trainable.engine.train_step([batch]).loss,
              trainable.engine.eval_loss([batch])]
    # both exports from this process (the converter sets up its own TP1/PP1 state)
    convert = load_example("convert_ualm_to_hf").main
    rcs = [convert([str(root / "ualm.nemo"), str(root / "from_nemo"), "--no-progress"]),
           convert([str(root / "ckpt"), str(root / "from_ckpt"), "--no-progress"])]
    return {"before": before, "after": after, "restored_type": type(restored).__name__,
            "backbone": config_only.ualm.backbone.hidden_size, "optimizer": restored.engine.optimizer is None,
            "rcs": rcs, "losses": losses}


def _save_at_tp2(root: str) -> float:
    """Both ranks write their shards of a TP2 model; returns its loss on the batch."""
    model, batch = _trained_model(Path(root), tp=2)
    model.save_to(str(Path(root) / "tp2.nemo"))
    return model.engine.eval_loss([batch])


def _restore_tp2(root: str) -> float:
    """A bare single process: restore_from sets up TP1/PP1 and reshards the TP2 archive."""
    from ualm_nemo.testing.batches import random_batch
    from ualm_nemo.training.nemo_model import UALMModel

    restored = UALMModel.restore_from(str(Path(root) / "tp2.nemo"))
    assert restored.run.model.parallel.tensor_model_parallel_size == 1
    return restored.engine.eval_loss([random_batch(restored.run.model.vocab, 2, 3)])


@pytest.fixture(scope="module")
def archived(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("nemo_archive")
    return {"root": root, **run_distributed(1, _save_restore, str(root))[0]}


def test_save_to_restore_from_gives_the_same_logits(archived):
    assert archived["restored_type"] == "UALMModel"
    assert len(archived["before"]) == len(archived["after"]) > 0
    for a, b in zip(archived["before"], archived["after"]):
        assert torch.equal(a, b)
    assert archived["optimizer"]  # restored without a trainer: for inference, no optimizer state allocated
    assert archived["backbone"] > 0  # return_config: the NeMo cfg alone, the run under 'ualm'


def test_restored_with_a_trainer_trains_on(archived):
    restored, first_step, after_step = archived["losses"]
    assert first_step == pytest.approx(restored, rel=1e-6)  # the step's forward ran on the archive's weights
    assert after_step < first_step  # and the optimizer (built over them, lr 1e-2) moved them


def test_archive_is_nemo_layout(archived):
    with tarfile.open(archived["root"] / "ualm.nemo") as tar:
        names = {Path(n).as_posix().removeprefix("./") for n in tar.getnames()}
    assert "model_config.yaml" in names
    assert "model_weights/ualm_common.pt" in names and "model_weights/.metadata" in names
    assert not any(Path(n).name.startswith("rank_") for n in names)  # no per-rank RNG state in a model archive
    assert not list(archived["root"].glob("ualm.nemo.tmp*"))  # staging folder and partial tar removed


def test_hf_export_of_the_archive_equals_the_checkpoints(archived):
    assert archived["rcs"] == [0, 0]
    a, b = archived["root"] / "from_nemo", archived["root"] / "from_ckpt"
    weights = sorted(p.relative_to(b) for p in b.rglob("*.safetensors"))
    assert weights == sorted(p.relative_to(a) for p in a.rglob("*.safetensors")) and weights
    for name in weights:
        x, y = load_file(a / name), load_file(b / name)
        assert x.keys() == y.keys()
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert (a / "tokenizer_config.json").is_file()  # the archive records the run's tokenizer, as a checkpoint does


def test_tp2_archive_restores_in_one_process(tmp_path):
    saved = run_distributed(2, _save_at_tp2, str(tmp_path))[0]
    restored = run_distributed(1, _restore_tp2, str(tmp_path))[0]
    assert restored == pytest.approx(saved, rel=1e-5)  # TP2 sums partial products in another order


def _refusals(root: str) -> dict:
    """convert_ualm_to_hf's exit code and stderr, and restore_from's error, for each bad archive."""
    import contextlib
    import io

    from ualm_nemo.training.nemo_model import UALMModel

    root = Path(root)
    (root / "broken.nemo").write_bytes(b"not a tar")
    (root / "model_config.yaml").write_text("foo: 1\n")
    with tarfile.open(root / "other.nemo", "w") as tar:
        tar.add(root / "model_config.yaml", arcname="model_config.yaml")
    convert, out = load_example("convert_ualm_to_hf").main, {}
    for name in ("broken", "other"):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = convert([str(root / f"{name}.nemo"), str(root / f"out_{name}"), "--no-progress"])
        out[name] = (rc, err.getvalue())
    for name, kwargs in (("restore_other", {}), ("restore_loose", {"strict": False})):
        try:
            UALMModel.restore_from(str(root / "other.nemo"), **kwargs)
            out[name] = "no error"
        except ValueError as error:
            out[name] = str(error)
    return out


def test_bad_archives_are_refused_in_one_line(tmp_path):
    got = run_distributed(1, _refusals, str(tmp_path))[0]
    assert got["broken"][0] == 2 and "not a readable .nemo archive" in got["broken"][1]
    assert got["other"][0] == 2 and "not a UALM .nemo archive" in got["other"][1]
    assert all(len(got[k][1].strip().splitlines()) == 1 for k in ("broken", "other"))  # no traceback
    assert "not a UALM .nemo archive" in got["restore_other"]
    assert "strict=False" in got["restore_loose"]
