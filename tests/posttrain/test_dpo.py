"""DPO on the Megatron engine: the loss against its closed form, sequence log-probs across layouts (real gloo
processes), offline == online reference, and a few steps that raise the margin."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from ualm_nemo.training.dpo import DPOConfig, pair_stats, preference_loss, score_mask
from ualm_nemo.testing.dist import run_distributed

pytestmark = pytest.mark.timeout(600)


# --- the math, on hand-made log-probs ----------------------------------------------------------------
def test_sigmoid_loss_is_trls_closed_form():
    # h = (-10 - -12) - (-15 - -13) = 4;  -log sigmoid(0.1 * 4) = log(1 + e^-0.4)
    loss = preference_loss(torch.tensor([-10.0]), torch.tensor([-15.0]), torch.tensor([-12.0]),
                           torch.tensor([-13.0]), beta=0.1)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.4)), rel=1e-6)
    assert preference_loss(torch.tensor([-10.0]), torch.tensor([-15.0]), torch.tensor([-12.0]),
                           torch.tensor([-13.0]), beta=0.1, kind="ipo").item() == pytest.approx((4 - 5) ** 2)


def test_policy_equal_to_reference_gives_ln2_and_zero_margin():
    logps = torch.randn(6, 8, dtype=torch.float64) * 20  # 3 pairs, 8 streams
    stats = pair_stats(logps, logps.clone(), torch.ones(6, 8), torch.zeros(3), DPOConfig(reference_logps="x"))
    assert torch.allclose(stats.loss, torch.full((3,), math.log(2), dtype=torch.float64))
    assert stats.reward_chosen.abs().max() == 0 and stats.stream_margin.abs().max() == 0


def test_stream_weights_and_sft_term():
    policy = torch.tensor([[-1.0, -2.0], [-3.0, -5.0]], dtype=torch.float64)  # one pair, 2 streams
    ref = torch.tensor([[-2.0, -2.0], [-3.0, -3.0]], dtype=torch.float64)
    cfg = DPOConfig(beta=0.5, sft_weight=2.0, stream_weights=[1.0, 0.5], reference_logps="x")
    stats = pair_stats(policy, ref, torch.ones(2, 2), torch.tensor([0.25], dtype=torch.float64), cfg)
    h = (1.0 * 1 + 0.0 * 0.5) - (0.0 * 1 + -2.0 * 0.5)  # weighted (policy - ref) chosen minus rejected = 2
    assert stats.preference.item() == pytest.approx(math.log1p(math.exp(-0.5 * h)))
    assert stats.loss.item() == pytest.approx(stats.preference.item() + 2.0 * 0.25)
    assert stats.stream_margin[0].tolist() == pytest.approx([0.5 * 1.0, 0.5 * 2.0 * 0.5])


def test_score_mask_leaves_out_what_the_delay_pattern_forces():
    """A TTA reply of F frames scores <|audio_start|>, the 8F codes, stream 0's end pad and <|im_end|>; the other
    delay pads and the forced <|audio_end|> are not scored."""
    from ualm_nemo.data.formatting import AudioOut, SampleFormatter
    from ualm_nemo.data.tokenizer import build_tokenizer
    from ualm_nemo.model.vocab import UnifiedVocab
    import random

    vocab = UnifiedVocab(text_vocab_size=320)
    formatter = SampleFormatter(build_tokenizer("byte"), vocab, cfg_dropout=0.0)
    frames = 5
    codes = torch.randint(0, 1024, (frames, 8), generator=torch.Generator().manual_seed(0))
    sample = formatter.format_conversation([("user", ["a dog"]), ("assistant", [AudioOut(codes)])], random.Random(0))
    mask = score_mask(sample["labels"][None], vocab)[0]
    assert int(mask.sum()) == 8 * frames + 3
    learned = sample["labels"] != -100
    assert int(learned.sum()) == 8 * (frames + 7) + 3  # what pre-training learns: every grid element
    assert not mask[sample["labels"][:, 0] == vocab.audio_end_id].any()


# --- on the engine ---------------------------------------------------------------------------------
def _tiny(tp: int = 1, pp: int = 1, vpp: int | None = None):
    from ualm_nemo.model.config import BACKBONES, AudioInputConfig, UALMConfig

    return UALMConfig(backbone=BACKBONES["tiny"],
                      audio_in=AudioInputConfig(adapter="mlp", random_encoder=True)).with_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp)


def _batches(manifest: str, cfg, per_micro: int = 2, micro: int = 2):
    from ualm_nemo.data.formatting import SampleFormatter
    from ualm_nemo.data.posttrain_dataset import collate_pairs, load_preference_dataset
    from ualm_nemo.data.tokenizer import build_tokenizer

    formatter = SampleFormatter.from_config(build_tokenizer("byte"), cfg, cfg_dropout=0.0)
    dataset, rejects = load_preference_dataset(manifest, formatter, None)
    assert not rejects
    return [collate_pairs([dataset[k * per_micro + i] for i in range(per_micro)], cfg.vocab) for k in range(micro)]


def _save_reference(root: str) -> None:
    from ualm_nemo.distributed import checkpoint
    from ualm_nemo.distributed.parallel import init_model_parallel
    from ualm_nemo.model.builder import build_model

    cfg = _tiny()
    init_model_parallel(cfg.parallel, seed=1234)
    checkpoint.save_checkpoint(root, 0, [build_model(cfg)], None, common={})


def _row_logps(root: str, manifest: str, tp: int, pp: int, vpp: int | None = None):
    from megatron.core import parallel_state as ps

    from ualm_nemo.distributed.parallel import init_model_parallel
    from ualm_nemo.training.dpo_reference import load_reference_model
    from ualm_nemo.training.engine import row_log_probs

    cfg = _tiny(tp, pp, vpp)
    init_model_parallel(cfg.parallel, seed=7)
    reports = row_log_probs(load_reference_model(cfg, root), cfg.vocab, _batches(manifest, cfg))
    return torch.cat([r["row_logps"] for r in reports]) if ps.is_pipeline_last_stage() else None


def _dpo_steps(root: str, manifest: str, reference: str, steps: int, sft_weight: float = 0.0, pp: int = 1,
               vpp: int | None = None) -> dict:
    from ualm_nemo.distributed.optim import OptimConfig
    from ualm_nemo.distributed.parallel import init_model_parallel
    from ualm_nemo.training.dpo_reference import load_reference_model
    from ualm_nemo.training.engine import MegatronEngine
    from ualm_nemo.training.objectives import DPOObjective

    cfg = _tiny(pp=pp, vpp=vpp)
    init_model_parallel(cfg.parallel, seed=7)
    dpo = DPOConfig(beta=0.1, sft_weight=sft_weight, reference=reference, reference_logps="sidecar",
                    reference_checkpoint=root)
    engine = MegatronEngine(cfg, OptimConfig(lr=2e-3, min_lr=2e-3, weight_decay=0.0), steps, stage="dpo",
                            initialize=False, objective=DPOObjective(dpo, cfg.vocab))
    engine.load_initial_weights(root)
    batches = _batches(manifest, cfg)
    if reference == "online":
        engine.set_reference(load_reference_model(cfg, root))
    else:  # what the sidecar holds: the reference's rows, scored once before training
        for batch, report in zip(batches, engine.row_log_probs(batches)):
            batch.ref_logps = report["row_logps"]
    results = [engine.train_step([dataclasses.replace(b) for b in batches]) for _ in range(steps)]
    return {"loss": [r.loss for r in results], "metrics": [r.metrics for r in results]}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from ualm_nemo.testing.pairs import write_pair_manifest

    root = tmp_path_factory.mktemp("dpo")
    manifest = write_pair_manifest(root / "data", 4)
    run_distributed(1, _save_reference, str(root / "ref"))
    return str(root / "ref" / "iter_0000000"), str(manifest)


def test_sequence_log_probs_agree_across_tp_and_pp(reference):
    root, manifest = reference
    single = run_distributed(1, _row_logps, root, manifest, 1, 1)[0]
    tp2 = run_distributed(2, _row_logps, root, manifest, 2, 1)
    pp2 = run_distributed(2, _row_logps, root, manifest, 1, 2)
    vpp2 = run_distributed(2, _row_logps, root, manifest, 1, 2, 2)  # the reference as 2 chunks per rank
    assert single.shape == (8, 8) and single[:, 0].abs().min() > 0  # every row scored its text stream
    assert (single[1::2][0::2, 1:] == 0).all() and (single[0::2, 1:] != 0).all()  # text replies: no codebooks
    assert torch.allclose(tp2[0], single, rtol=1e-5, atol=1e-4) and torch.allclose(tp2[1], single, rtol=1e-5,
                                                                                    atol=1e-4)
    assert pp2[0] is None and torch.allclose(pp2[1], single, rtol=1e-5, atol=1e-4)
    assert vpp2[0] is None and torch.allclose(vpp2[1], single, rtol=1e-5, atol=1e-4)


def test_offline_and_online_references_train_alike_and_raise_the_margin(reference):
    root, manifest = reference
    offline = run_distributed(1, _dpo_steps, root, manifest, "offline", 6)[0]
    online = run_distributed(1, _dpo_steps, root, manifest, "online", 6)[0]
    # policy and online reference as interleaved chunks (PP2 x VPP2): the same steps
    interleaved = run_distributed(2, _dpo_steps, root, manifest, "online", 6, 0.0, 2, 2)
    assert offline["loss"][0] == pytest.approx(math.log(2), abs=1e-9)  # policy == reference at step 1
    assert offline["metrics"][0].margin == pytest.approx(0.0, abs=1e-9)
    assert online["loss"] == pytest.approx(offline["loss"], rel=1e-9, abs=1e-12)
    for rank in (0, 1):
        assert interleaved[rank]["loss"] == pytest.approx(online["loss"], rel=1e-5, abs=1e-6), f"rank {rank}"
    margins = [m.margin for m in offline["metrics"]]
    assert margins[-1] > margins[1] > 0 and offline["metrics"][-1].accuracy == 1.0
    assert offline["loss"][-1] < math.log(2) - 0.05
    assert len(offline["metrics"][-1].stream_margin) == 8
