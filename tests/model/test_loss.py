"""The vocab-parallel UALM loss against a hand computation from the model's own (gathered) logits."""

from __future__ import annotations

import pytest
import torch

from ualm_nemo.testing.dist import run_distributed


def _loss_vs_hand(head: str) -> dict:
    import torch.nn.functional as F

    from ualm_nemo.distributed.parallel import init_model_parallel
    from ualm_nemo.model.builder import build_model
    from ualm_nemo.model.config import BACKBONES, AudioInputConfig, AudioOutputConfig, UALMConfig
    from ualm_nemo.model.vocab import IGNORE_INDEX

    cfg = UALMConfig(backbone=BACKBONES["tiny"], audio_in=AudioInputConfig(enabled=False),
                     audio_out=AudioOutputConfig(head=head))
    init_model_parallel(cfg.parallel, seed=3)
    model = build_model(cfg).eval()
    v = cfg.vocab
    # one row: text "5", text "7", <|audio_start|>, two audio frames, <|audio_end|>
    rows = [v.text_position_streams(5), v.text_position_streams(7), v.text_position_streams(v.audio_start_id)]
    rows += v.codes_to_ids(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15, 1024]])).tolist()
    rows.append(v.text_position_streams(v.audio_end_id))
    tokens = torch.tensor(rows)[None]  # [1, 6, 8]
    labels = torch.full_like(tokens, IGNORE_INDEX)
    weights = torch.zeros(tokens.shape)
    labels[0, :-1] = tokens[0, 1:]
    labels[0, 0] = IGNORE_INDEX  # prompt target: no loss
    labels[0, 1, 1:] = IGNORE_INDEX  # target <|audio_start|> is a text position
    labels[0, 4, 1:] = IGNORE_INDEX  # target <|audio_end|> too
    weights[0, 1, 0] = weights[0, 4, 0] = 1.0  # text weight
    weights[0, 2:4] = 0.125  # audio frames: every stream
    with torch.no_grad():
        per_position = model(tokens, labels, weights)  # [1, 6]
        stream0, codebooks = model(tokens)  # [1, 6, V], [1, 6, 7, 1025]
    hand = torch.zeros(6)
    for t in range(6):
        if labels[0, t, 0] != IGNORE_INDEX:
            hand[t] += weights[0, t, 0] * F.cross_entropy(stream0[0, t], labels[0, t, 0])
        for n in range(1, 8):
            if labels[0, t, n] != IGNORE_INDEX:
                target = labels[0, t, n] - v.codebook_start(n)
                hand[t] += weights[0, t, n] * F.cross_entropy(codebooks[0, t, n - 1], target)
    return {"model": per_position[0], "hand": hand, "vocab": stream0.shape[-1], "size": v.size}


@pytest.mark.parametrize("head", ["shared", "per_codebook"])
def test_loss_matches_hand_computation(head):
    out = run_distributed(1, _loss_vs_hand, head)[0]
    assert out["vocab"] == out["size"]  # padded columns are not part of the vocabulary
    assert out["hand"][0] == 0 and out["hand"][5] == 0  # masked positions carry no loss
    torch.testing.assert_close(out["model"], out["hand"], rtol=1e-5, atol=1e-5)
    assert float(out["hand"].sum()) > 1.0
