"""The multi-stream embedding: the sum of the streams' rows, codebook pads zero, tables never overlap."""

from __future__ import annotations

import torch

from ualm_nemo.testing.dist import run_distributed


def _embedding_by_hand() -> dict:
    from ualm_nemo.distributed.parallel import init_model_parallel
    from ualm_nemo.model.builder import transformer_config
    from ualm_nemo.model.config import AudioInputConfig, BACKBONES, UALMConfig, padded
    from ualm_nemo.model.embedding import MultiStreamEmbedding

    cfg = UALMConfig(backbone=BACKBONES["tiny"], audio_in=AudioInputConfig(random_encoder=True))
    init_model_parallel(cfg.parallel, seed=0)
    from megatron.core import parallel_state

    emb = MultiStreamEmbedding(transformer_config(cfg), cfg, parallel_state.get_tensor_model_parallel_group())
    with torch.no_grad():  # make the text table's padding rows non-zero, as training might
        emb.text.weight[cfg.num_text_rows:] = 5.0
    v = cfg.vocab
    first_audio = v.codes_to_ids(torch.zeros(8, dtype=torch.long))  # code 0 of each codebook
    rows = torch.stack([torch.tensor(v.text_position_streams(7)), first_audio,
                        v.codes_to_ids(torch.full((8,), 1024))])  # text, audio frame, all pads
    with torch.no_grad():
        out = emb(rows[None])[:, 0]  # [3, h]
    text_w, audio_w = emb.text.weight, emb.audio.weight
    expected_audio = sum(audio_w[int(i) - v.audio_offset] for i in first_audio)
    return {"text": torch.allclose(out[0], text_w[7]), "audio": torch.allclose(out[1], expected_audio),
            "pads_zero": bool((out[2] == 0).all()),
            "overlap": padded(cfg.num_text_rows) > v.audio_offset}


def test_streams_sum_and_tables_do_not_overlap():
    out = run_distributed(1, _embedding_by_hand)[0]
    assert out["overlap"]  # the case that matters: padded text rows cover the first audio ids
    assert out["text"] and out["audio"] and out["pads_zero"]
