"""Each stage trains what it claims: a few real steps at TP2 (the special rows live on one rank's shard), then
parameter by parameter, frozen weights are bit-identical and trainable ones moved, rows of the partly frozen text
tables included. Weight decay is on, so a frozen row that only escaped its gradient would still move."""

from __future__ import annotations

import pytest

from ualm_nemo.testing.dist import run_distributed

STAGES = ("align", "pretrain", "sft", "dpo")


def _train_each_stage(tp: int = 2, pp: int = 1, vpp: int | None = None) -> dict[str, list[str]]:
    import torch
    from megatron.core import parallel_state

    from ualm_nemo.distributed.optim import OptimConfig
    from ualm_nemo.distributed.parallel import init_model_parallel
    from ualm_nemo.model.config import BACKBONES, AudioInputConfig, UALMConfig
    from ualm_nemo.testing.batches import random_batch
    from ualm_nemo.training.engine import MegatronEngine
    from ualm_nemo.training.stages import is_trainable, special_row_mask, special_rows_only

    cfg = UALMConfig(backbone=BACKBONES["tiny"], audio_in=AudioInputConfig(random_encoder=True)).with_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp)
    vocab = cfg.vocab
    init_model_parallel(cfg.parallel, seed=0)
    optim = OptimConfig(lr=1e-2, min_lr=1e-3, weight_decay=0.1, warmup_steps=0)
    batches = [random_batch(vocab, 4, seed, with_audio_input=True) for seed in range(3 * pp)]
    steps = [batches[k * pp:(k + 1) * pp] for k in range(3)]  # PP micro-batches a step (VPP's rule)
    problems: dict[str, list[str]] = {}
    for stage in STAGES:
        torch.manual_seed(0)
        engine = MegatronEngine(cfg, optim, max_steps=10, stage=stage)
        before = [{n: p.detach().clone() for n, p in chunk.named_parameters()} for chunk in engine.chunks]
        for microbatches in steps:
            engine.train_step(microbatches)
        bad = problems.setdefault(stage, [])
        for model, name, param, old in ((chunk, n, p, before[i][n]) for i, chunk in enumerate(engine.chunks)
                                        for n, p in chunk.named_parameters()):
            new = param.detach()
            if special_rows_only(stage, name):
                keep = special_row_mask(model, name, param).squeeze(-1)
                if not torch.equal(old[~keep], new[~keep]):
                    bad.append(f"{name}: a frozen (text) row moved")
                first = int(model.embedding.text.vocab_start_index) if name.startswith("embedding") \
                    else model.heads.tp_rank * model.heads.text_part
                # rows the batches reach: <|audio_start|> as input and target, <|audio_end|> as target
                used = [vocab.audio_start_id] + ([vocab.audio_end_id] if name.startswith("heads") else [])
                for token in used:
                    if 0 <= token - first < param.shape[0] and torch.equal(old[token - first], new[token - first]):
                        bad.append(f"{name}: special row {token} did not train")
            elif is_trainable(stage, name):
                if torch.equal(old, new):
                    bad.append(f"{name}: trainable but unchanged")
            elif not torch.equal(old, new):
                bad.append(f"{name}: frozen but moved")
        model = engine.chunks[0]
        if stage == "align" and parallel_state.get_tensor_model_parallel_rank() == 1:
            groups = engine.optimizer.param_groups if hasattr(engine.optimizer, "param_groups") else []
            text = model.embedding.text.weight
            decays = [g["weight_decay"] for g in groups for p in g["params"] if p is text or
                      getattr(p, "partially_frozen", False)]
            if decays and any(d != 0 for d in decays):
                bad.append(f"a partly frozen table is decayed: {decays}")
    return problems


@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", [(2, 1, None), (1, 2, 2)], ids=["tp2", "pp2-vpp2"])
def test_each_stage_trains_exactly_its_parameters(layout):
    """pp2-vpp2: every chunk of every rank (the tables on chunk 0 of rank 0, the heads on chunk 1 of rank 1)."""
    results = run_distributed(2, _train_each_stage, *layout)
    for rank, problems in results.items():
        assert problems == {stage: [] for stage in STAGES}, f"rank {rank}: {problems}"
