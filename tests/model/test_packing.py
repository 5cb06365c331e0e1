"""Packed rows compute exactly what the samples compute alone: positions restart, attention stays inside."""

from __future__ import annotations

import torch

from ualm_nemo.testing.dist import run_distributed


def _packed_vs_alone() -> dict:
    from ualm_nemo.distributed.parallel import init_model_parallel
    from ualm_nemo.model.builder import build_model
    from ualm_nemo.model.config import BACKBONES, AudioInputConfig, UALMConfig
    from ualm_nemo.testing.batches import random_sample

    cfg = UALMConfig(backbone=BACKBONES["tiny"], audio_in=AudioInputConfig(enabled=False))
    init_model_parallel(cfg.parallel, seed=4)
    model = build_model(cfg).eval()
    gen = torch.Generator().manual_seed(0)
    a, b = random_sample(cfg.vocab, 5, 6, gen), random_sample(cfg.vocab, 7, 3, gen)
    la, lb = a["tokens"].shape[0], b["tokens"].shape[0]
    pad = 3  # trailing padding of the packed row
    pad_row = torch.tensor(cfg.vocab.text_position_streams(cfg.vocab.pad_id))
    packed = {k: torch.cat([a[k], b[k]]) for k in ("tokens", "labels", "loss_weights")}
    packed["tokens"] = torch.cat([packed["tokens"], pad_row.repeat(pad, 1)])
    packed["labels"] = torch.cat([packed["labels"], torch.full((pad, 8), -100)])
    packed["loss_weights"] = torch.cat([packed["loss_weights"], torch.zeros(pad, 8)])
    position_ids = torch.cat([torch.arange(la), torch.arange(lb), torch.arange(pad)])
    segment_ids = torch.cat([torch.zeros(la), torch.ones(lb), -torch.ones(pad)]).long()
    with torch.no_grad():
        loss_packed = model(packed["tokens"][None], packed["labels"][None], packed["loss_weights"][None],
                            position_ids=position_ids[None], segment_ids=segment_ids[None])[0]
        loss_a = model(a["tokens"][None], a["labels"][None], a["loss_weights"][None])[0]
        loss_b = model(b["tokens"][None], b["labels"][None], b["loss_weights"][None])[0]
        # without the packing inputs, the second sample would see the first: the loss must differ
        loss_leaky = model(packed["tokens"][None], packed["labels"][None], packed["loss_weights"][None])[0]
    return {"packed": loss_packed, "alone": torch.cat([loss_a, loss_b, torch.zeros(pad)]), "leaky": loss_leaky,
            "la": la}


def test_packed_row_equals_samples_alone():
    out = run_distributed(1, _packed_vs_alone)[0]
    torch.testing.assert_close(out["packed"], out["alone"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out["leaky"][out["la"]:], out["alone"][out["la"]:], atol=1e-4)
