"""perf/* figures of real tiny training runs (training/throughput.py): values checked against what the steps
really trained on, the straggler note over two gloo processes, and W&B offline files."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
from pathlib import Path

import pytest

from ualm_nemo.testing.dist import run_distributed
from ualm_nemo.training.nemo_model import UALMModel
from ualm_nemo.training.throughput import stragglers

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

PERF = {"step_time_s", "data_wait_s", "tokens_per_s", "tokens_per_s_per_gpu", "samples_per_s",
        "samples_per_s_per_gpu", "tflops_per_gpu", "peak_memory_gib"}


class CountingModel(UALMModel):
    """The real model; records each step's positions and model FLOPs (this rank), and on ``slow_rank`` sleeps
    after the step (inside the step, after its collectives: the others then wait in the log gather)."""

    def __init__(self, run, trainer, slow_rank: int | None, sleep_s: float) -> None:
        super().__init__(run, trainer=trainer)
        self.slow_rank, self.sleep_s, self.counted = slow_rank, sleep_s, []

    def training_step(self, step, batch_idx: int) -> None:
        from ualm_nemo.model.flops import flops_per_token

        super().training_step(step, batch_idx)
        shapes = [tuple(mb.tokens.shape[:2]) for mb in step.microbatches]
        self.counted.append((sum(r * s for r, s in shapes),
                             sum(r * s * flops_per_token(self.run.model, s)["total"] for r, s in shapes)))
        if self.trainer.global_rank == self.slow_rank:
            time.sleep(self.sleep_s)


def _config(output_dir: str, steps: int, log_every: int, wandb: bool, tp: int = 1) -> dict:
    cfg = {"model": {"backbone": "tiny", "audio_in": {"random_encoder": True},
                     "parallel": {"tensor_model_parallel_size": tp}},
           "optim": {"lr": 2e-3, "min_lr": 2e-3, "warmup_steps": 0, "weight_decay": 0.0},
           "train": {"max_steps": steps, "global_batch_size": 4, "micro_batch_size": 2,
                     "checkpoint_every_n_steps": 2, "log_every_n_steps": log_every},
           "data": {"synthesize": True, "synthetic_samples_per_task": 8}, "output_dir": output_dir}
    if wandb:
        cfg["logger"] = {"wandb": {"project": "ualm-test", "name": "tiny", "dir": f"{output_dir}/wandb"}}
    return cfg


def _run(output_dir: str, steps: int, log_every: int, wandb: bool = False, slow_rank: int | None = None,
         sleep_s: float = 0.0, tp: int = 1) -> dict:
    """build_trainer + fit as train() does, with the counting model; returns its records and the warnings."""
    from ualm_nemo.training.run_config import run_config_from_dict
    from ualm_nemo.training.train import build_trainer

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("ualm_nemo.training.throughput").addHandler(handler)
    run = run_config_from_dict(_config(output_dir, steps, log_every, wandb, tp))
    trainer = build_trainer(run)
    model = CountingModel(run, trainer, slow_rank, sleep_s)
    start, console = time.perf_counter(), io.StringIO()
    with contextlib.redirect_stderr(console):  # the progress bar's line (rank 0)
        trainer.fit(model)
    return {"counted": model.counted, "warnings": records, "wall_s": time.perf_counter() - start,
            "samples": model.trained_samples, "console": console.getvalue()}


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder)).Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="module")
def one_rank_run(tmp_path_factory) -> tuple[Path, dict]:
    """4 steps on one process, perf/* every 2 steps, a checkpoint every 2, W&B offline next to TensorBoard."""
    import os

    out = tmp_path_factory.mktemp("perf") / "run"
    old = os.environ.get("WANDB_MODE")
    os.environ["WANDB_MODE"] = "offline"
    try:
        result = run_distributed(1, _run, str(out), 4, 2, True)[0]
    finally:
        os.environ.pop("WANDB_MODE") if old is None else os.environ.__setitem__("WANDB_MODE", old)
    return out, result


def test_perf_scalars_match_what_the_steps_trained(one_rank_run):
    out, result = one_rank_run
    scalars = _scalars(out / "tensorboard")
    perf = {tag.removeprefix("perf/"): values for tag, values in scalars.items() if tag.startswith("perf/")}
    assert PERF <= set(perf) and "mfu" not in perf  # on CPU: FLOP/s only, no MFU
    assert all([s for s, _ in perf[k]] == [2, 4] for k in PERF)
    figures = {k: dict(v) for k, v in perf.items()}
    counted = result["counted"]
    for step, window in ((2, counted[0:2]), (4, counted[2:4])):
        f = {k: v[step] for k, v in figures.items() if step in v}
        positions = sum(p for p, _ in window) / 2  # per step, the window's mean
        flops = sum(fl for _, fl in window) / 2
        assert 0 < f["step_time_s"] < result["wall_s"]
        assert 0 <= f["data_wait_s"] < f["step_time_s"]
        assert f["tokens_per_s"] == pytest.approx(positions / f["step_time_s"], rel=1e-5)
        assert f["tokens_per_s_per_gpu"] == pytest.approx(f["tokens_per_s"], rel=1e-6)  # one GPU
        assert f["samples_per_s"] == pytest.approx(4 / f["step_time_s"], rel=1e-5)  # global batch 4
        # TFLOP/s = the shared formula's FLOPs of these positions / step time; per position between the formula
        # at length 1 and at the longest row (the attention term grows with the length)
        assert f["tflops_per_gpu"] * 1e12 == pytest.approx(flops / f["step_time_s"], rel=1e-5)
        assert 0.05 < f["peak_memory_gib"] < 64  # this process's peak RSS
    bar = [line for line in result["console"].replace("\r", "\n").splitlines() if line.startswith("train:")]
    last_line = bar[-1]  # the bar at the end: step 4's figures
    assert f"tok/s={figures['tokens_per_s'][4]:.4g}" in last_line and "TFLOP/s/gpu=" in last_line
    assert "MFU" not in last_line and "loss=" in last_line
    assert "checkpoint_save_s" not in figures or 2 not in figures["checkpoint_save_s"]  # no save before step 2's log
    assert 0 < figures["checkpoint_save_s"][4] < result["wall_s"]  # step 2's save


def test_flops_per_position_follow_the_formula(one_rank_run):
    from ualm_nemo.model.config import BACKBONES
    from ualm_nemo.model.flops import flops_per_token
    from ualm_nemo.training.run_config import run_config_from_dict

    out, result = one_rank_run
    cfg = run_config_from_dict(_config(str(out), 4, 2, False)).model
    seq_len = run_config_from_dict(_config(str(out), 4, 2, False)).data.seq_len
    positions, flops = result["counted"][0]
    assert flops_per_token(cfg, 1)["total"] < flops / positions < flops_per_token(cfg, seq_len)["total"]
    b = BACKBONES["tiny"]
    # 6 N per position + 12 L h x the batch's row length: the implied length is a real one (1..seq_len)
    length = (flops / positions - 6 * flops_per_token(cfg, 0)["matmul_params"]) / (12 * b.num_layers * b.hidden_size)
    assert 1 <= length <= seq_len


def _wandb_history(path: Path) -> list[dict[str, float]]:
    """The history rows of an offline run file (.wandb): wandb's leveldb-style log (a 7-byte file header, then
    32 KiB blocks of records, each crc32 4 + length 2 + type 1 bytes + data; FULL=1, FIRST/MIDDLE/LAST=2/3/4)
    of wandb Record protobufs. wandb 0.31 ships no Python reader for it (its core is in Go)."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw, block, rows, pos, parts = path.read_bytes(), 32768, [], 7, b""
    assert raw[:4] == b":W&B"
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # the block's tail is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(raw[pos + 4:pos + 6], "little"), raw[pos + 6]
        parts, pos = parts + raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record, parts = pb.Record.FromString(parts), b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def test_wandb_offline_run_has_the_perf_metrics(one_rank_run):
    out, _ = one_rank_run
    runs = list((out / "wandb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, f"one offline run expected: {runs}"
    rows = _wandb_history(next(runs[0].glob("run-*.wandb")))
    perf = [r for r in rows if "perf/tokens_per_s" in r]
    assert [r["trainer/global_step"] for r in perf] == [2, 4] and all({f"perf/{k}" for k in PERF} <= set(r)
                                                                      for r in perf)
    tensorboard = dict(_scalars(out / "tensorboard")["perf/tokens_per_s"])
    assert [r["perf/tokens_per_s"] for r in perf] == pytest.approx([tensorboard[2], tensorboard[4]], rel=1e-6)
    # the model's own figures go there too (every logger gets every figure)
    assert [r["trainer/global_step"] for r in rows if "train/loss" in r] == [2, 4]


def test_straggler_named_over_two_gloo_processes(tmp_path):
    """DP2; rank 1 sleeps 1.5 s in each of its steps: rank 0 warns, naming rank 1; a TP2 run without it does not
    (and counts the one batch both TP ranks trained once)."""
    slow = run_distributed(2, _run, str(tmp_path / "slow"), 2, 1, False, 1, 1.5)
    assert slow[1]["warnings"] == []  # rank 0 reports
    notes = slow[0]["warnings"]
    assert len(notes) == 2 and all("rank 1 took" in n for n in notes), notes
    scalars = _scalars(tmp_path / "slow" / "tensorboard")
    assert [s for s, _ in scalars["perf/tokens_per_s"]] == [1, 2]
    # totals count both data-parallel ranks: 4 samples per step
    step_time = dict(scalars["perf/step_time_s"])
    positions = slow[0]["counted"][1][0] + slow[1]["counted"][1][0]  # both ranks' step 2
    assert dict(scalars["perf/tokens_per_s"])[2] == pytest.approx(positions / step_time[2], rel=1e-5)
    assert dict(scalars["perf/tokens_per_s_per_gpu"])[2] == pytest.approx(positions / 2 / step_time[2], rel=1e-5)
    assert dict(scalars["perf/samples_per_s"])[2] == pytest.approx(4 / step_time[2], rel=1e-5)
    assert dict(scalars["perf/samples_per_s_per_gpu"])[2] == pytest.approx(2 / step_time[2], rel=1e-5)
    # TP2, nobody slowed: no note; both ranks trained the same batch, counted once
    even = run_distributed(2, _run, str(tmp_path / "even"), 2, 1, False, None, 0.0, 2)
    assert even[0]["warnings"] == [] and even[0]["counted"] == even[1]["counted"]
    scalars = _scalars(tmp_path / "even" / "tensorboard")
    step_time = dict(scalars["perf/step_time_s"])
    assert dict(scalars["perf/tokens_per_s"])[2] == pytest.approx(even[0]["counted"][1][0] / step_time[2], rel=1e-5)
    assert dict(scalars["perf/samples_per_s"])[2] == pytest.approx(4 / step_time[2], rel=1e-5)


def test_straggler_rule():
    assert stragglers([1.0, 1.1, 0.9, 3.0], 1.5) == {3: pytest.approx(3.0)}
    assert stragglers([1.0, 1.6], 1.5) == {1: pytest.approx(1.6)}  # two ranks: against the other one
    assert stragglers([1.0, 1.4], 1.5) == {} and stragglers([2.0], 1.5) == {}


def test_mfu_against_the_gpu_peak_by_hand():
    """Two data-parallel GPUs, 2 s per step, 1e15 model FLOPs each per step: 2e15 / 2 s / 2 GPUs = 500 TFLOP/s per
    GPU, MFU 500 / 989 on an H100; the peak comes from the device name, and none (no MFU) for a CPU."""
    from ualm_nemo.model.flops import peak_flops
    from ualm_nemo.training.throughput import ThroughputMonitor

    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA H200") == 989e12 and peak_flops("Tesla T4") is None
    monitor = ThroughputMonitor(10)
    monitor.peak = peak_flops("NVIDIA H100 80GB HBM3")
    rows = [[2.0, 1.9, 0.1, 4096.0, 4.0, 1e15, 2.0 * 2**30], [2.0, 1.8, 0.2, 4096.0, 4.0, 1e15, 3.0 * 2**30]]
    f = monitor.figures(rows, 12.5)  # no model-parallel state here: every rank is its own replica (DP = world)
    assert f["tflops_per_gpu"] == pytest.approx(500.0) and f["mfu"] == pytest.approx(500 / 989)
    assert f["tokens_per_s"] == pytest.approx(8192 / 2.0) and f["tokens_per_s_per_gpu"] == pytest.approx(2048.0)
    assert f["samples_per_s"] == pytest.approx(4.0) and f["data_wait_s"] == 0.2 and f["peak_memory_gib"] == 3.0
    assert f["checkpoint_save_s"] == 12.5
    monitor.peak = None
    assert "mfu" not in monitor.figures(rows, None) and "checkpoint_save_s" not in monitor.figures(rows, None)


def test_wandb_keys_are_checked():
    from ualm_nemo.model.config import ConfigError
    from ualm_nemo.training.run_config import run_config_from_dict

    assert run_config_from_dict({}).logger.wandb is None  # off by default
    cfg = run_config_from_dict({"logger": {"wandb": {"project": "ualm", "name": "7b"}}}).logger.wandb
    assert (cfg.project, cfg.name, cfg.dir) == ("ualm", "7b", None)
    with pytest.raises(ConfigError, match="logger.wandb.projekt"):
        run_config_from_dict({"logger": {"wandb": {"projekt": "ualm"}}})
    with pytest.raises(ConfigError, match="logger.wandb.project must be set"):
        run_config_from_dict({"logger": {"wandb": {"name": "7b"}}})
    with pytest.raises(ConfigError, match="logger.tensorboard"):
        run_config_from_dict({"logger": {"tensorboard": True}})
