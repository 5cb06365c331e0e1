"""launcher.plan's arithmetic against the truth.

* Parameters: per_rank_parameters equals, element for element, the parameters of the real tiny model built by
  ualm_nemo.model.builder at TP2, PP2 (both stages) and TP1 (the DP2 run), for both head kinds and both adapters,
  trainable vs frozen as the pretrain and align stages set them (real gloo processes, one launch).
* The backbone arithmetic at full size: Qwen2.5-0.5B (tied) and 7B (untied) published parameter counts.
* Memory: the bytes Megatron's DDP and distributed optimizer actually allocate for the tiny bf16 model at DP2 (the
  production configuration: bf16 weights, fp32 grad buffer, distributed optimizer): weights exactly; the Adam
  moments + fp32 master shards summed over the DP ranks exactly (the shards partition the trainable parameters),
  and per rank equal to formula / DP up to the bucket padding; the grad buffer = formula + padding.
* The command: the 7B blend plan on 2 DGX H100 nodes composes with placeholders and prints table and JSON.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import pytest

from launcher import plan
from ualm_nemo.model.config import BACKBONES, AudioInputConfig, AudioOutputConfig, ParallelConfig, UALMConfig
from ualm_nemo.testing.dist import run_distributed

pytestmark = pytest.mark.timeout(300)

LAYOUTS = [(2, 1), (1, 2), (1, 1)]  # (TP, PP) on 2 processes: TP2, PP2, DP2
VARIANTS = [("shared", "linear"), ("per_codebook", "mlp")]


def _tiny(tp: int, pp: int, head: str, adapter: str, dtype: str = "fp32") -> UALMConfig:
    return UALMConfig(backbone=BACKBONES["tiny"], audio_in=AudioInputConfig(adapter=adapter, random_encoder=True),
                      audio_out=AudioOutputConfig(head=head), params_dtype=dtype).with_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)


def _measure() -> dict:
    """On each rank: real parameter counts per layout/variant/stage, then the bf16 DP2 optimizer's buffers."""
    from megatron.core import parallel_state as ps

    from ualm_nemo.distributed.optim import OptimConfig, build_optimizer, wrap_ddp
    from ualm_nemo.distributed.parallel import init_model_parallel
    from ualm_nemo.model.builder import build_model
    from ualm_nemo.training.stages import apply_stage

    out: dict = {"counts": {}}
    for tp, pp in LAYOUTS:
        for head, adapter in VARIANTS:
            cfg = _tiny(tp, pp, head, adapter)
            init_model_parallel(cfg.parallel, seed=1)
            model = build_model(cfg)
            for stage in ("pretrain", "align"):
                trainable, total = apply_stage(model, stage)
                grads = sum(p.numel() for p in model.parameters() if p.requires_grad)
                out["counts"][(tp, pp, head, adapter, stage)] = (ps.get_pipeline_model_parallel_rank(),
                                                                 ps.get_tensor_model_parallel_rank(), trainable,
                                                                 total - trainable, grads)
    cfg = _tiny(1, 1, "shared", "linear", "bf16")  # DP2, distributed optimizer (the default)
    init_model_parallel(cfg.parallel, seed=1)
    model = build_model(cfg)
    apply_stage(model, "pretrain")
    out["weights"] = sum(p.numel() * p.element_size() for p in model.parameters())
    chunks = wrap_ddp([model], cfg)
    optimizer = build_optimizer(chunks, OptimConfig(), cfg)
    buffers = list(chunks[0].buffers) + list(chunks[0].expert_parallel_buffers)
    out["grad_buffer"] = sum(b.grad_data.numel() * b.grad_data.element_size() for b in buffers)
    out["grad_numel"] = sum(b.grad_data.numel() for b in buffers)
    state = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        opt.init_state_fn(opt.optimizer, opt.config)  # Adam's m, v as the first step (or a checkpoint load) makes
        for group in opt.optimizer.param_groups:
            for p in group["params"]:  # the fp32 master shards of bf16 weights, or shards of fp32 weights
                moments = sum(t.numel() * t.element_size() for t in opt.optimizer.state[p].values()
                              if hasattr(t, "numel") and t.dim() > 0)
                master = p.numel() * p.element_size() if any(p is m for g in opt.shard_fp32_from_float16_groups
                                                             for m in g) else 0
                state += moments + master
    out["optimizer"] = state
    return out


@pytest.fixture(scope="module")
def measured():
    return run_distributed(2, _measure)


@functools.lru_cache(maxsize=None)
def _encoder(adapter: str) -> tuple[int, int]:
    encoder, dim, _ = plan.audio_encoder_size(_tiny(1, 1, "shared", adapter))
    return encoder, dim


def _parts(cfg: UALMConfig) -> list[plan.Part]:
    return plan.parameter_counts(cfg, *_encoder(cfg.audio_in.adapter))


def test_per_rank_parameters_equal_the_built_models(measured):
    checked = 0
    for rank, result in measured.items():
        for (tp, pp, head, adapter, stage), (pp_rank, tp_rank, trainable, frozen, grads) in result["counts"].items():
            cfg = _tiny(tp, pp, head, adapter)
            got = plan.per_rank_parameters(_parts(cfg), cfg.backbone.num_layers, tp, pp, pp_rank, stage, tp_rank)
            assert (got["trainable"], got["frozen"], got["with_grad"]) == (trainable, frozen, grads), \
                (rank, tp, pp, head, adapter, stage)
            checked += 1
    assert checked == 2 * len(LAYOUTS) * len(VARIANTS) * 2
    # PP2's two stages hold different parts; TP2 halves the sharded tables
    pp_ranks = {measured[r]["counts"][(1, 2, "shared", "linear", "pretrain")][0] for r in (0, 1)}
    assert pp_ranks == {0, 1}


def test_backbone_arithmetic_matches_published_counts():
    assert plan.backbone_parameters(BACKBONES["qwen2.5-0.5b"], tied=True) == 494_032_768
    assert plan.backbone_parameters(BACKBONES["qwen2.5-7b"], tied=False) == 7_615_616_512
    # parameter_counts' decoder and tables are that backbone (plus UALM's rows and vocabulary padding)
    cfg = UALMConfig(backbone=BACKBONES["qwen2.5-7b"], audio_in=AudioInputConfig(enabled=False))
    parts = {p.label: p for p in plan.parameter_counts(cfg, 0, 0)}
    b = cfg.backbone
    layers = parts["decoder layers"]
    qwen_part = (layers.sharded + layers.replicated) * b.num_layers + parts["final norm"].replicated \
        + 2 * b.text_vocab_size * b.hidden_size
    assert qwen_part == 7_615_616_512
    text_rows = parts["text embedding"].sharded // b.hidden_size
    assert text_rows % 128 == 0 and 0 <= text_rows - cfg.num_text_rows < 128


def test_memory_formula_matches_megatron_allocations(measured):
    cfg = _tiny(1, 1, "shared", "linear", "bf16")
    params = plan.per_rank_parameters(_parts(cfg), cfg.backbone.num_layers, 1, 1, 0, "pretrain")
    dp = 2
    assert params["with_grad"] == params["trainable"]  # pretrain: every non-encoder parameter trains
    formula = plan.state_bytes(params["trainable"], params["frozen"], "bf16", dp, True,
                               params["trainable_norms"], params["frozen_norms"])
    whole = plan.state_bytes(params["trainable"], params["frozen"], "bf16", 1, True,
                             params["trainable_norms"], params["frozen_norms"])
    padding = measured[0]["grad_numel"] - params["trainable"]  # elements Megatron adds for alignment
    assert 0 <= padding < 0.01 * params["trainable"]
    for rank in (0, 1):
        m = measured[rank]
        assert m["weights"] == formula["weights"]  # bf16 weights + fp32 norms + the bf16 frozen encoder
        assert m["grad_buffer"] == formula["grads"] + 4 * padding  # fp32 grads of every trainable parameter
        assert abs(m["optimizer"] - formula["optimizer"]) <= 12 * padding  # this rank's 1/DP of 12 B/param
    # the DP shards partition the trainable parameters: together exactly the unsharded optimizer's bytes
    assert measured[0]["optimizer"] + measured[1]["optimizer"] == whole["optimizer"]


def test_activation_and_flop_formulas_by_hand():
    b = BACKBONES["qwen2.5-7b"]
    h, f = b.hidden_size, b.ffn_hidden_size
    kv = b.num_query_groups * b.kv_channels
    # fused attention, TP4, no SP: replicated 8h + split (2(h + 2kv) + 2h + 6f) / 4
    assert plan.layer_activation_bytes(b, 4096, 4, False, "te", "none") == 8 * h + (2 * (h + 2 * kv) + 2 * h + 6 * f) / 4
    local = plan.layer_activation_bytes(b, 4096, 1, False, "local", "none")
    assert local - plan.layer_activation_bytes(b, 4096, 1, False, "local", "selective") == 2 * b.num_attention_heads * 4096
    assert plan.layer_activation_bytes(b, 4096, 4, True, "te", "full") == 2 * h / 4
    cfg = UALMConfig(backbone=b)
    per_token = plan.flops_per_token(cfg, 4096)
    assert per_token["attention"] == 12 * b.num_layers * h * 4096
    assert per_token["total"] == 6 * per_token["matmul_params"] + per_token["attention"]
    t = plan.wall_clock(1e18, 16, 989e12, 0.4, 1000)
    assert t["step_s"] == pytest.approx(1e18 / (16 * 989e12 * 0.4)) and t["run_s"] == pytest.approx(1000 * t["step_s"])


def test_command_plans_7b_blend_with_placeholders(capsys):
    flags = ["--cluster", "dgx-h100", "--nodes", "2"]
    overrides = ["--", "model=qwen2.5-7b", "data=pretrain_blend", "train.global_batch_size=64",
                 "train.micro_batch_size=1"]
    assert plan.main(flags + overrides) == 0
    text = capsys.readouterr().out
    assert "TP 4 x PP 1 x DP 4" in text and "model.audio_in.encoder_path" in text and "GiB" in text
    assert plan.main(flags + ["--json", "--recompute", "full", "--mfu", "0.5"] + overrides) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["layout"]["world"] == 16 and data["time"]["gpu"] == "h100" and data["time"]["mfu"] == 0.5
    stage = data["stages"][0]
    # the encoder (frozen) is Qwen2.5-Omni-7B's audio tower; the rest of a rank is ~ a quarter of the model
    assert stage["parameters"]["frozen"] == 639_647_232
    assert stage["memory"]["total"] == pytest.approx(sum(v for k, v in stage["memory"].items() if k != "total"))
    assert data["batch"]["tokens_per_step"] == 64 * 16384  # data.shar.max_tokens per micro-batch


def test_command_rejects_a_bad_layout(capsys):
    assert plan.main(["--cluster", "dgx-h100", "--nodes", "1", "--", "model=qwen2.5-7b", "data=pretrain_blend",
                      "model.parallel.tensor_model_parallel_size=16"]) == 2
    assert "tensor_model_parallel_size" in capsys.readouterr().err


def test_interleaved_pipeline_activations_follow_the_schedule():
    """VPP: the first stage keeps L (1 + (pp - 1) / (pp v)) layers of activations (Korthikanti et al.) where 1F1B
    keeps L; the last stage (v - 1) pp + 1 chunks of L / (pp v) layers where 1F1B keeps L / pp; a step of only pp
    micro-batches is all warm-up (every chunk of every micro-batch in flight)."""
    b = BACKBONES["qwen2.5-7b"]  # 28 layers: PP4 x VPP7 = one layer per chunk
    flat = UALMConfig(backbone=b, parallel=ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=4))
    vpp = dataclasses.replace(flat, parallel=dataclasses.replace(flat.parallel, virtual_pipeline_model_parallel_size=7))
    layer = plan.layer_activation_bytes(b, 4096, 2, False, plan.attention_kind(flat), "none")
    batch = plan.Batch(rows=1, seq_len=4096, micro_batches=16, per_rank=8)
    head = 4096 * plan.head_activation_bytes(flat, 2)

    def layers_kept(cfg, stage, at=batch):
        return (plan.activation_bytes(cfg, at, 2, 4, stage, "none") - (head if stage == 3 else 0)) / (4096 * layer)

    assert layers_kept(flat, 0) == pytest.approx(28) and layers_kept(flat, 3) == pytest.approx(7)
    assert layers_kept(vpp, 0) == pytest.approx(28 * (1 + 3 / 28))
    assert layers_kept(vpp, 3) == pytest.approx((6 * 4 + 1) * 28 / 28)
    four = dataclasses.replace(batch, micro_batches=8, per_rank=4)
    assert layers_kept(vpp, 0, four) == pytest.approx(28) == layers_kept(vpp, 3, four)


def test_young_daly_figures_by_hand():
    """16 GPUs at 4.7e-4 failures per GPU-day, a 30 s save, 10 s steps, a 300 s restart, by hand:
    MTBF = 86400 / (4.7e-4 x 16) = 11,489,361.7 s (133 days); tau* = sqrt(2 x 30 x 11,489,361.7) = 26,255.7 s
    = 2,626 steps; goodput(tau) = tau / (tau + 30) x (1 - (300 + (tau + 30) / 2) / MTBF):
    at 2,626 steps (26,260 s) 26,260 / 26,290 x (1 - 13,445 / 11,489,361.7) = 0.99769;
    at 100 steps (1,000 s) 1,000 / 1,030 x (1 - 815 / 11,489,361.7) = 0.97080, 26x below the optimum: a warning."""
    from launcher import failures

    f = failures.plan_failures(gpus=16, step_s=10.0, max_steps=100_000, every_n_steps=100, ckpt_bytes=1e9, nodes=2,
                               write_gbps=1.0, save_s=30.0, restart_s=300.0, failures_per_gpu_day=4.7e-4)
    assert f["mtbf_s"] == pytest.approx(11_489_361.7, rel=1e-8)
    assert f["optimum_s"] == pytest.approx(26_255.7, rel=1e-5) and f["optimum_steps"] == 2626
    assert f["goodput_optimum"] == pytest.approx(0.99769, abs=1e-5)
    assert f["goodput_configured"] == pytest.approx(0.97080, abs=1e-5)
    assert f["expected_failures"] == pytest.approx(1e6 / 11_489_361.7)
    assert f["save_from"].startswith("measured") and "26x below" in f["warning"]
    assert "checkpoint_every_n_steps=2626" in f["warning"]
    # the optimum is the least lost time: goodput falls on either side of it
    best = failures.goodput(26_255.7, 30.0, 300.0, f["mtbf_s"])
    assert all(failures.goodput(26_255.7 * k, 30.0, 300.0, f["mtbf_s"]) < best for k in (0.5, 0.9, 1.1, 2.0))
    # within 3x either way: no warning; far above: a warning that says so
    near = failures.plan_failures(gpus=16, step_s=10.0, max_steps=1, every_n_steps=1000, ckpt_bytes=1e9, nodes=2,
                                  write_gbps=1.0, save_s=30.0, restart_s=300.0, failures_per_gpu_day=4.7e-4)
    assert near["warning"] is None
    far = failures.plan_failures(gpus=16, step_s=10.0, max_steps=1, every_n_steps=10_000, ckpt_bytes=1e9, nodes=2,
                                 write_gbps=1.0, save_s=30.0, restart_s=300.0, failures_per_gpu_day=4.7e-4)
    assert "4x above" in far["warning"]
    # no measured save: the bytes over the nodes' write rate (1e9 B / (1 GB/s x 2 nodes) = 0.5 s)
    est = failures.plan_failures(gpus=16, step_s=10.0, max_steps=1, every_n_steps=100, ckpt_bytes=1e9, nodes=2,
                                 write_gbps=1.0, save_s=None, restart_s=300.0, failures_per_gpu_day=4.7e-4)
    assert est["save_s"] == pytest.approx(0.5) and "--write-gbps" in est["save_from"]
    assert failures.LLAMA3_FAILURES_PER_GPU_DAY == pytest.approx(4.7e-4, rel=0.01)  # 419 / (54 x 16,384)


def test_checkpoint_bytes_by_hand():
    assert plan.checkpoint_bytes(10, 8, "bf16") == 2 * 10 + 12 * 8  # weights + fp32 master and Adam m, v
    assert plan.checkpoint_bytes(10, 8, "fp32") == 4 * 10 + 8 * 8


def test_command_plans_the_checkpoint_interval(capsys):
    """The 7B blend on 2 DGX H100 nodes: the failure figures in text and JSON; a measured save replaces the
    estimate; train.checkpoint_every_n_steps=100 is far below the optimum and warned about."""
    flags = ["--cluster", "dgx-h100", "--nodes", "2"]
    overrides = ["--", "model=qwen2.5-7b", "data=pretrain_blend", "train.global_batch_size=64",
                 "train.micro_batch_size=1", "train.max_steps=660000"]
    assert plan.main(flags + ["--json"] + overrides) == 0
    data = json.loads(capsys.readouterr().out)
    f, whole = data["failures"], data["parameters"]["total"]
    assert f["checkpoint_bytes"] > 2 * whole  # bf16 weights + optimizer state of the trainable ones
    assert f["save_s"] == pytest.approx(f["checkpoint_bytes"] / (2e9 * 2))  # default 2 GB/s per node, 2 nodes
    assert f["mtbf_s"] == pytest.approx(86400 / (plan.LLAMA3_FAILURES_PER_GPU_DAY * 16))
    assert f["optimum_s"] == pytest.approx((2 * f["save_s"] * f["mtbf_s"]) ** 0.5)
    assert f["goodput_optimum"] > f["goodput_configured"] and f["configured_steps"] == 100
    assert "below the optimum" in f["warning"]
    print(f"README figures: checkpoint {f['checkpoint_bytes'] / 1e9:.1f} GB, save {f['save_s']:.1f} s, optimum "
          f"{f['optimum_steps']} steps ({f['optimum_s'] / 3600:.2f} h), goodput at 100 {f['goodput_configured']:.4f}"
          f" vs optimum {f['goodput_optimum']:.4f}", file=__import__("sys").stderr)
    assert plan.main(flags + ["--save-seconds", "5", "--failures-per-gpu-day", "0.01"] + overrides) == 0
    text = capsys.readouterr().out
    assert "save 5.0 s (measured (--save-seconds))" in text and "Young/Daly interval" in text
    assert plan.main(flags + ["--write-gbps", "0"] + overrides) == 2
    assert "--write-gbps=0.0 must be > 0" in capsys.readouterr().err
