"""Validation during training (train.val_every_n_steps): a fixed held-out set scored per task and per stream,
logged to TensorBoard, kept with the checkpoint and in validation.jsonl, continued exactly by a resumed run."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from ualm_nemo.data.microbatch import MicroBatch
from ualm_nemo.model.config import ConfigError
from ualm_nemo.model.vocab import IGNORE_INDEX
from ualm_nemo.testing.batches import same_batch
from ualm_nemo.testing.dist import run_distributed
from ualm_nemo.training.run_config import check_data_paths, run_config_from_dict
from ualm_nemo.training.validation import ValidationLog, ValidationLoss, position_tasks

SHAR = {"seed": 5, "window_size": 8, "max_tokens": 512, "seq_len": 256, "pack": True}


def _config(output_dir: str, shar_dirs: dict, stop_at: int | None = None) -> dict:
    sources = [{"name": task, "shar_dir": path, "weight": 1.0} for task, path in shar_dirs.items()]
    return {"model": {"backbone": "tiny", "audio_in": {"random_encoder": True}},
            "optim": {"lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 1},
            "train": {"max_steps": 6, "global_batch_size": 2, "micro_batch_size": 1, "checkpoint_every_n_steps": 100,
                      "log_every_n_steps": 1, "stop_at_step": stop_at, "val_every_n_steps": 2, "val_batches": 2},
            "data": {"tokenizer": "byte", "shar": {"sources": sources, **SHAR}, "val_sources": sources},
            "output_dir": output_dir}


def _independent_val_loss(model, shar_dirs: dict) -> float:
    """The held-out batches built here from the loader itself, scored by the training loss (engine.eval_loss)."""
    import itertools

    from megatron.core import parallel_state

    from ualm_nemo.data.formatting import SampleFormatter
    from ualm_nemo.data.shar_dataset import SharBatchLoader, SharLoaderConfig
    from ualm_nemo.data.tokenizer import build_tokenizer

    sources = [{"name": task, "shar_dir": path, "weight": 1.0} for task, path in shar_dirs.items()]
    formatter = SampleFormatter.from_config(build_tokenizer("byte"), model.run.model, cfg_dropout=0.0)
    loader = SharBatchLoader(SharLoaderConfig(sources=sources, **SHAR), formatter,
                             parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size())
    return model.engine.eval_loss(list(itertools.islice(loader, 2)))


def _runs(root: str, shar_dirs: dict) -> dict:
    """In one launch: an uninterrupted 6-step run, then a job ended at step 3 and a new job resuming it."""
    from ualm_nemo.training.train import train

    straight = train(_config(f"{root}/straight", shar_dirs))
    out = {"straight": straight.loss_history, "eval_loss": _independent_val_loss(straight, shar_dirs),
           "straight_last": straight.last_validation}
    first = train(_config(f"{root}/resumed", shar_dirs, stop_at=3))
    second = train(_config(f"{root}/resumed", shar_dirs))
    out.update(first=first.loss_history, second=second.loss_history, first_last=first.last_validation)
    out["pp2"] = _pipeline_figures(straight.run, f"{root}/straight/checkpoints")
    return out


def _pipeline_figures(run, checkpoints: str) -> dict:
    """The straight run's weights at PP2 (2 stages, DP1): validation figures (computed on the last stage, then
    shared) and eval_loss on the same held-out batches, seen from every stage."""
    from ualm_nemo.distributed.checkpoint_check import find_resumable
    from ualm_nemo.distributed.parallel import init_model_parallel
    from ualm_nemo.training.engine import MegatronEngine
    from ualm_nemo.training.validation import build_val_batches

    cfg = run.model.with_parallel(pipeline_model_parallel_size=2)
    init_model_parallel(cfg.parallel, seed=run.train.seed)
    engine = MegatronEngine(cfg, None, run.train.max_steps, train=False, initialize=False)
    engine.load(str(find_resumable(checkpoints)), load_optimizer=False)
    batches = build_val_batches(run, 0, 1)
    objective = ValidationLoss(8)
    return {"figures": objective.summarise(engine.evaluate(batches, objective)), "eval_loss": engine.eval_loss(batches)}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_validation_series_survives_a_resume(tmp_path, demo_shar):
    """DP2 (2 processes): val at steps 2, 4, 6; a job ended at step 3 + a resumed job == an uninterrupted run,
    bit for bit (jsonl, TensorBoard, checkpoint); the figures against an independent computation; and at PP2."""
    runs = run_distributed(2, _runs, str(tmp_path), demo_shar)
    out = runs[0]
    # PP2: the last stage computes, every stage gets the same figures; the loss is the training loss there too
    assert runs[0]["pp2"] == runs[1]["pp2"]
    assert runs[0]["pp2"]["figures"]["loss"] == runs[0]["pp2"]["eval_loss"]
    assert out["first"] + out["second"] == out["straight"]  # validating changes nothing in training
    straight = ValidationLog(tmp_path / "straight").read()
    resumed = ValidationLog(tmp_path / "resumed").read()
    assert [r["step"] for r in resumed] == [2, 4, 6]
    assert resumed == straight  # bit for bit (json round-trips floats exactly)
    assert straight[-1] == out["straight_last"]
    # the checkpoint of step 3 keeps the figures of step 2 (what the first job handed on)
    common = torch.load(tmp_path / "resumed" / "checkpoints" / "iter_0000003" / "ualm_common.pt",
                        weights_only=False)
    assert common["validation"] == out["first_last"] == straight[0]
    assert common["tokenizer"] == "byte"  # data.tokenizer: the HF export writes it into the folder
    assert common["run_config"]["data"]["tokenizer"] == "byte"  # the run's sections, for the export's model card
    assert common["run_config"]["train"]["stop_at_step"] == 3
    assert set(common["run_config"]) == {"data", "train", "optim"}

    last = straight[-1]
    assert last["loss"] == out["eval_loss"]  # the held-out loss is the training loss on the same batches
    tasks = [t for t in ("tta", "understanding", "text") if f"loss_{t}" in last]
    assert tasks == ["tta", "understanding", "text"]  # packed rows mix the tasks: each is told apart
    assert sum(last[f"tokens_{t}"] for t in tasks) == last["tokens"]
    recombined = sum(last[f"loss_{t}"] * last[f"tokens_{t}"] for t in tasks) / last["tokens"]
    assert recombined == pytest.approx(last["loss"], rel=1e-6)  # float32 sums per micro-batch
    assert all(math.isfinite(last[f"loss_stream{k}"]) for k in range(8))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "resumed" / "tensorboard")).Reload()
    for key in ("loss", "loss_tta", "loss_understanding", "loss_text", "loss_stream0", "loss_stream7"):
        scalars = events.Scalars(f"val/{key}")
        assert [e.step for e in scalars] == [2, 4, 6]
        assert [e.value for e in scalars] == pytest.approx([r[key] for r in straight], rel=1e-6)


def test_task_and_stream_figures_by_hand():
    """A packed batch of two rows (three samples), per-stream NLL given: every sum checked by hand."""
    labels = torch.full((2, 4, 8), IGNORE_INDEX)
    labels[0, :3, 0] = 1  # row 0: sample 0 (tta) at 0..1, sample 1 (text) at 2..3 (its last label IGNORE)
    labels[0, :2, 1:] = 1
    labels[1, :2, 0] = 1  # row 1: sample 2 (understanding) at 0..2, padding at 3
    weights = (labels != IGNORE_INDEX).float() * 0.5
    segments = torch.tensor([[0, 0, 1, 1], [0, 0, 0, -1]])
    batch = MicroBatch(tokens=torch.zeros(2, 4, 8, dtype=torch.long), labels=labels, loss_weights=weights,
                       lengths=torch.tensor([4, 3]), tasks=["tta", "text", "understanding"], segment_ids=segments,
                       position_ids=torch.tensor([[0, 1, 0, 1], [0, 1, 2, 3]]))
    assert position_tasks(batch).tolist() == [[0, 0, 2, 2], [1, 1, 1, 1]]
    nll = torch.arange(64, dtype=torch.float32).view(2, 4, 8) * (labels != IGNORE_INDEX)
    objective = ValidationLoss(8)
    figures = objective.summarise(objective.loss(batch, nll)[2]["report"].double())
    per_position = (nll * weights).sum(-1)
    assert figures["tokens"] == 5 and figures["loss"] == pytest.approx(float(per_position.sum()) / 5)
    assert figures["loss_tta"] == pytest.approx(float(per_position[0, :2].sum()) / 2)
    assert figures["loss_text"] == pytest.approx(float(per_position[0, 2]) / 1)
    assert figures["loss_understanding"] == pytest.approx(float(per_position[1, :2].sum()) / 2)
    assert "loss_conversation" not in figures
    assert figures["loss_stream0"] == pytest.approx((0 + 8 + 16 + 32 + 40) / 5)
    assert figures["loss_stream3"] == pytest.approx((3 + 11) / 2)
    with pytest.raises(ValueError, match="preference"):
        position_tasks(dataclasses.replace(batch, tasks=["tta", "preference", "text"]))


def test_log_keeps_each_step_once(tmp_path):
    log = ValidationLog(tmp_path)
    for step in (2, 4, 6):
        log.append(step, {"loss": float(step)})
    log.append(4, {"loss": 0.5})  # a job resumed from step 3 redoes step 4: 6 goes, it will be redone too
    assert [(r["step"], r["loss"]) for r in log.read()] == [(2, 2.0), (4, 0.5)]
    assert json.loads((tmp_path / "validation.jsonl").read_text().splitlines()[0]) == {"step": 2, "loss": 2.0}


def _bad(tmp_path, demo_shar, train=None, data=None, stage="pretrain") -> str:
    cfg = _config(str(tmp_path), demo_shar)
    cfg["train"].update(train or {})
    cfg["train"]["stage"] = stage
    cfg["data"].update(data or {})
    with pytest.raises(ConfigError) as err:
        run = run_config_from_dict(cfg).validate()
        check_data_paths(run)
    return str(err.value)


def test_bad_validation_keys_are_named(tmp_path, demo_shar):
    assert "train.val_every_n_steps=0" in _bad(tmp_path, demo_shar, {"val_every_n_steps": 0})
    assert "train.val_batches=0" in _bad(tmp_path, demo_shar, {"val_batches": 0})
    assert "needs held-out data: set data.val_sources" in _bad(tmp_path, demo_shar, data={"val_sources": None})
    assert "data.val_sources is empty" in _bad(tmp_path, demo_shar, data={"val_sources": []})
    assert "data.val_sources must be a list" in _bad(tmp_path, demo_shar, data={"val_sources": "etta"})
    both = _bad(tmp_path, demo_shar, data={"val_text_manifest": str(tmp_path / "t.jsonl")})
    assert "data.val_sources and data.val_text_manifest" in both
    missing = _bad(tmp_path, demo_shar, data={"val_sources": [{"name": "held", "shar_dir": str(tmp_path / "no"),
                                                               "weight": 1.0}]})
    assert "data.val_sources[0] (held)" in missing and "no shards/ folder" in missing
    gone = _bad(tmp_path, demo_shar, data={"val_sources": None, "val_tta_manifest": str(tmp_path / "no.jsonl")})
    assert "data.val_tta_manifest=" in gone and "no such file" in gone


def test_held_out_manifests(tmp_path, demo_shar, caplog):
    """data.val_*_manifest: the same micro-batches at every build (the held-out clips encoded once, then read from
    <output_dir>/val_codes_cache.pt), each DP rank its own, refused when too few."""
    from pathlib import Path

    from ualm_nemo.training.validation import build_val_batches

    raw = Path(demo_shar["tta"]).parents[1] / "raw"  # the raw manifests the demo Shar sources were made from
    cfg = _config(str(tmp_path), demo_shar)
    cfg["train"].update(val_batches=3, micro_batch_size=2)
    cfg["data"] = {"tokenizer": "byte", "tta_manifest": str(raw / "tta.jsonl"),
                   "val_tta_manifest": str(raw / "tta.jsonl"),
                   "val_understanding_manifest": str(raw / "understanding.json"),
                   "val_text_manifest": str(raw / "text.jsonl")}
    run = run_config_from_dict(cfg).validate()
    check_data_paths(run)
    rank0 = build_val_batches(run, 0, 2)
    cache = Path(run.output_dir) / "val_codes_cache.pt"
    assert cache.is_file()
    with caplog.at_level("INFO", logger="ualm_nemo.data.dataset"):
        again, rank1 = build_val_batches(run, 0, 2), build_val_batches(run, 1, 2)
    assert f"read from {cache}" in caplog.text  # a later job start (or another rank) does not encode again
    assert len(rank0) == len(rank1) == 3 and all(len(b.tasks) == 2 for b in rank0)
    assert all(same_batch(a, b) for a, b in zip(rank0, again, strict=True))
    assert not torch.equal(rank0[0].tokens[:, :8], rank1[0].tokens[:, :8])
    objective = ValidationLoss(8)
    total = sum(objective.loss(b, (b.labels != IGNORE_INDEX).float())[2]["report"].double() for b in rank0)
    figures = objective.summarise(total)
    assert figures["loss_stream0"] == 1.0 and figures["tokens"] > 0
    cfg["train"]["val_batches"] = 50
    with pytest.raises(ConfigError, match="train.val_batches=50"):
        build_val_batches(run_config_from_dict(cfg).validate(), 0, 2)
