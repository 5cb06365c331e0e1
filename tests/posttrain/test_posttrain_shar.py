"""Post-training from Lhotse Shar through train() (real processes): conversations and pairs prepared and tokenised
into Shar like pre-training data, SFT on the conversation source, DPO with the online reference on the pair source
(step 1 is ln 2: policy == reference; a resumed run equals a straight one bit for bit), and the refusals that
stop a wrong source or an offline reference before a model is built."""

from __future__ import annotations

import math

import pytest

from ualm_nemo.testing.dist import run_distributed
from ualm_nemo.testing.runs import tiny_run

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]


def _shar(source: str, shar_dir: str, pack: bool) -> dict:
    return {"cfg_dropout": 0.0, "shar": {"sources": [{"name": source, "shar_dir": shar_dir}], "seed": 3,
                                         "window_size": 4, "max_tokens": 1024, "seq_len": 512, "pack": pack,
                                         "num_workers": 0}}


def _dpo(root: str, output_dir: str, max_steps: int = 4, stop_at: int | None = None, source: str = "pairs",
         reference: str = "online") -> dict:
    cfg = tiny_run(output_dir, "dpo", max_steps, f"{root}/sft/checkpoints",
                   _shar(source, f"{root}/shar/{source}", False), stop_at)
    cfg["dpo"] = {"beta": 0.1, "reference": reference, "reference_checkpoint": f"{root}/sft/checkpoints",
                  "reference_logps": f"{root}/unused.json" if reference == "offline" else None}
    return cfg


def _train(cfg: dict) -> dict:
    from ualm_nemo.training.train import train

    model = train(cfg)
    return {"history": model.loss_history, "step": model.engine.step, "consumed": model.trained_samples,
            "margins": [(model.engine.step, model.last_result.metrics.as_log()["dpo/margin"])]
            if model.last_result is not None and model.last_result.metrics is not None else []}


def _refused(cfg: dict) -> str:
    from ualm_nemo.model.config import ConfigError
    from ualm_nemo.training.run_config import check_local_paths, run_config_from_dict

    try:
        check_local_paths(run_config_from_dict(cfg).validate())
    except ConfigError as err:
        return str(err)
    return "not refused"


@pytest.fixture(scope="module")
def chain(tmp_path_factory, pretrained):
    """The 2-step pre-training run; conversations and pairs -> prepare -> codec stage -> Shar; 3 SFT steps from
    Shar."""
    from ualm_nemo.data.tokenize_stage import tokenize_source
    from ualm_nemo.codec.xcodec import CodecTokenizer, build_tiny_xcodec
    from ualm_nemo.data.cuts import prepare_source
    from ualm_nemo.testing.pairs import write_conversation_manifest, write_pair_manifest

    root = tmp_path_factory.mktemp("posttrain_shar")
    codec = CodecTokenizer(build_tiny_xcodec(seed=0), max_batch_size=1)
    for name, task, manifest in (("convs", "conversation", write_conversation_manifest(root / "raw_convs", 6)),
                                 ("pairs", "preference", write_pair_manifest(root / "raw_pairs", 6))):
        report = prepare_source(task, manifest, root / "prepared" / name)
        assert report.num_rejects == 0
        tokenize_source(root / "prepared" / name / "cuts.jsonl.gz", root / "shar" / name, codec, shard_size=4,
                        progress=False)
    sft = run_distributed(1, _train, tiny_run(str(root / "sft"), "sft", 3, f"{pretrained}/checkpoints",
                                              _shar("convs", str(root / "shar" / "convs"), True)))[0]
    return {"root": str(root), "pre": pretrained, "sft": sft}


def test_sft_trains_on_conversations_from_shar(chain):
    out = chain["sft"]
    assert out["step"] == 3 and [s for s, _ in out["history"]] == [1, 2, 3]
    assert all(math.isfinite(loss) for _, loss in out["history"]) and out["consumed"] >= 3 * 2


def test_dpo_from_shar_with_the_online_reference_resumes_bit_exactly(chain):
    root = chain["root"]
    straight = run_distributed(1, _train, _dpo(root, f"{root}/dpo_straight"))[0]
    first = run_distributed(1, _train, _dpo(root, f"{root}/dpo_resumed", stop_at=2))[0]
    second = run_distributed(1, _train, _dpo(root, f"{root}/dpo_resumed"))[0]
    assert [s for s, _ in first["history"]] == [1, 2] and [s for s, _ in second["history"]] == [3, 4]
    assert first["history"] + second["history"] == straight["history"]
    assert straight["history"][0][1] == pytest.approx(math.log(2), abs=1e-5)  # the SFT model is both
    assert second["consumed"] == straight["consumed"] >= 4 * 2  # pairs: token-budget micro-batches hold >= 1
    assert straight["margins"][0][1] > 0  # four steps at lr 2e-3 prefer the chosen turns of the pairs seen


def test_post_training_refuses_the_wrong_shar_source_before_building_a_model(chain):
    root, init = chain["root"], f"{chain['pre']}/checkpoints"
    message = _refused(_dpo(root, f"{root}/x", source="convs"))
    assert "sources[0] (convs) holds 'conversation' cuts" in message and "preference pairs" in message
    sft_on_pairs = tiny_run(f"{root}/x", "sft", 2, init, _shar("pairs", f"{root}/shar/pairs", False))
    assert "holds 'preference' cuts: train.stage=sft" in _refused(sft_on_pairs)
    assert "dpo.reference=online" in _refused(_dpo(root, f"{root}/x", reference="offline"))
    packed = _dpo(root, f"{root}/x")
    packed["data"]["shar"]["pack"] = True
    assert "data.shar.pack: true with preference sources (pairs)" in _refused(packed)
    missing = tiny_run(f"{root}/x", "sft", 2, init, _shar("convs", f"{root}/nowhere", True))
    assert "has no shards/ folder" in _refused(missing)
    no_data = tiny_run(f"{root}/x", "sft", 2, init, {})
    assert "train.stage=sft needs conversations" in _refused(no_data)
