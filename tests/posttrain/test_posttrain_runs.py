"""Post-training end to end through train() (NeMo model class, Lightning, Megatron strategy; real processes):
pre-train -> SFT on multi-audio conversations -> score the reference -> DPO with the offline sidecar, bit-exact
resume, and the sidecar refusals (fingerprint mismatch, a pair without an entry)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from ualm_nemo.testing.dist import run_distributed
from ualm_nemo.testing.runs import tiny_run

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]


def _dpo_cfg(root: str, output_dir: str, max_steps: int = 4, stop_at: int | None = None) -> dict:
    cfg = tiny_run(output_dir, "dpo", max_steps, f"{root}/sft/checkpoints",
                   {"dpo_manifest": f"{root}/pairs/pairs.jsonl", "cfg_dropout": 0.0}, stop_at)
    cfg["dpo"] = {"beta": 0.1, "reference": "offline", "reference_logps": f"{root}/reference.json",
                  "reference_checkpoint": f"{root}/sft/checkpoints"}
    return cfg


def _train(cfg: dict) -> dict:
    from ualm_nemo.training.train import train

    model = train(cfg)
    return {"history": model.loss_history, "step": model.engine.step, "consumed": model.trained_samples,
            "rejects": len(model.rejects)}


def _score(cfg: dict) -> str:
    from ualm_nemo.posttrain.score_reference import score_reference

    return str(score_reference(cfg))


def _refused(cfg: dict) -> str:
    from ualm_nemo.model.config import ConfigError

    try:
        _train(cfg)
    except ConfigError as err:
        return str(err)
    return "not refused"


@pytest.fixture(scope="module")
def chain(tmp_path_factory, pretrained):
    """The 2-step pre-training run, then 3 SFT steps from it on conversations that write a clip and hear it again."""
    from ualm_nemo.testing.pairs import write_conversation_manifest, write_pair_manifest

    root = tmp_path_factory.mktemp("posttrain")
    sft_manifest = write_conversation_manifest(root / "convs", 4)
    sft = tiny_run(str(root / "sft"), "sft", 3, f"{pretrained}/checkpoints",
                   {"sft_manifest": str(sft_manifest), "codec_path": f"{pretrained}/codec", "cfg_dropout": 0.05})
    sft_out = run_distributed(1, _train, sft)[0]
    write_pair_manifest(root / "pairs", 4)
    return {"root": str(root), "sft": sft_out}


def test_sft_trains_from_the_pretrained_checkpoint(chain):
    out = chain["sft"]
    assert out["step"] == 3 and out["rejects"] == 0 and out["consumed"] == 3 * 2
    assert all(math.isfinite(loss) for _, loss in out["history"])


def test_dpo_from_the_sidecar_resumes_bit_exactly(chain):
    """score_reference (TP2, another layout than training) -> DPO: 4 steps straight == 2 + a resumed 2; step 1's loss
    is ln 2 (policy == reference); the margin series is in TensorBoard."""
    root = chain["root"]
    run_distributed(2, _score, {**_dpo_cfg(root, f"{root}/score"),
                                "model": {"backbone": "tiny", "audio_in": {"random_encoder": True},
                                          "parallel": {"tensor_model_parallel_size": 2}}})
    stamp = json.loads(open(f"{root}/reference.json").read())
    assert sorted(stamp["logps"]) == [f"pair-{k}" for k in range(4)] and stamp["fingerprint"]["reference_step"] == 3
    # a run configured with interleaved pipeline stages scores (without them: one batch per call) the same rows
    interleaved = _dpo_cfg(root, f"{root}/score_vpp")
    interleaved["dpo"]["reference_logps"] = f"{root}/reference_vpp.json"
    interleaved["model"]["parallel"] = {"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2}
    run_distributed(2, _score, interleaved)
    vpp_logps = json.loads(open(f"{root}/reference_vpp.json").read())["logps"]
    for pair, sides in stamp["logps"].items():
        for side, values in sides.items():
            assert vpp_logps[pair][side] == pytest.approx(values, rel=1e-5, abs=1e-4), (pair, side)

    straight = run_distributed(1, _train, _dpo_cfg(root, f"{root}/dpo_straight"))[0]
    first = run_distributed(1, _train, _dpo_cfg(root, f"{root}/dpo_resumed", stop_at=2))[0]
    second = run_distributed(1, _train, _dpo_cfg(root, f"{root}/dpo_resumed"))[0]
    assert [s for s, _ in first["history"]] == [1, 2] and [s for s, _ in second["history"]] == [3, 4]
    assert first["history"] + second["history"] == straight["history"]
    assert straight["history"][0][1] == pytest.approx(math.log(2), abs=1e-4)  # TP2-scored reference == policy
    assert second["consumed"] == straight["consumed"] == 4 * 2  # pairs

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(f"{root}/dpo_resumed/tensorboard").Reload()
    assert [e.step for e in events.Scalars("dpo/margin")] == [1, 2, 3, 4]
    assert {"dpo/accuracy", "dpo/reward_chosen", "dpo/reward_rejected", "dpo/preference_loss",
            "dpo/margin_stream0"} <= set(events.Tags()["scalars"])


def test_dpo_refuses_a_sidecar_for_other_data(chain):
    """A changed pair manifest (fingerprint), a pair the sidecar does not hold and a sidecar scored at another step of
the reference run are refused before training."""
    root = chain["root"]
    if not Path(f"{root}/reference.json").exists():  # this test run alone
        run_distributed(1, _score, _dpo_cfg(root, f"{root}/score1"))
    changed = f"{root}/pairs_changed"
    shutil.copytree(f"{root}/pairs", changed)
    lines = open(f"{changed}/pairs.jsonl").read().splitlines()
    extra = json.loads(lines[0])
    extra["id"] = "pair-new"
    open(f"{changed}/pairs.jsonl", "w").write("\n".join(lines + [json.dumps(extra)]) + "\n")

    cfg = _dpo_cfg(root, f"{root}/dpo_changed")
    cfg["data"]["dpo_manifest"] = f"{changed}/pairs.jsonl"
    message = run_distributed(1, _refused, cfg)[0]
    assert "was scored for other inputs (data: sidecar" in message and "rescore" in message

    # the same pairs plus one: the sidecar's stamp rewritten to the new manifest, the new pair has no entry
    from ualm_nemo.eval.checkpoints import sha256

    sidecar = json.loads(open(f"{root}/reference.json").read())
    sidecar["fingerprint"]["data"] = sha256(f"{changed}/pairs.jsonl")
    open(f"{root}/reference_stale.json", "w").write(json.dumps(sidecar))
    cfg["dpo"]["reference_logps"] = f"{root}/reference_stale.json"
    message = run_distributed(1, _refused, cfg)[0]
    assert "has no entry for 1 of 5 training pairs (pair-new)" in message

    # scored at an earlier step of the reference run than the one dpo.reference_checkpoint now resolves to
    sidecar = json.loads(open(f"{root}/reference.json").read())
    sidecar["fingerprint"]["reference_step"] = 2
    open(f"{root}/reference_earlier.json", "w").write(json.dumps(sidecar))
    cfg = _dpo_cfg(root, f"{root}/dpo_earlier")
    cfg["dpo"]["reference_logps"] = f"{root}/reference_earlier.json"
    message = run_distributed(1, _refused, cfg)[0]
    assert "reference_step: sidecar 2, this run 3" in message
