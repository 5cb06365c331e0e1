"""The Megatron model decodes with megatron-core's static KV cache: the same logits and the same codes and text
as recomputing the sequence, at TP1 and TP2 (real gloo processes); its embedding and heads equal the single-device
reference functions (model/stream_math.py) on the gathered weights; PP>1 is refused with the reason."""

from __future__ import annotations

import pytest
import torch

from ualm_nemo.testing.dist import run_distributed


def _model(tp: int, pp: int = 1, head: str = "shared"):
    from ualm_nemo.distributed.parallel import init_model_parallel
    from ualm_nemo.model.builder import build_model
    from ualm_nemo.model.config import AudioInputConfig, AudioOutputConfig, BACKBONES, UALMConfig

    cfg = UALMConfig(backbone=BACKBONES["tiny"], audio_in=AudioInputConfig(random_encoder=True),
                     audio_out=AudioOutputConfig(head=head)).with_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    init_model_parallel(cfg.parallel, seed=1)
    return build_model(cfg).eval(), cfg


def _requests(cfg):
    from ualm_nemo.data.formatting import AudioIn, SampleFormatter
    from ualm_nemo.data.tokenizer import ByteChatTokenizer
    from ualm_nemo.inference.engine import Request

    fmt = SampleFormatter(ByteChatTokenizer(), cfg.vocab, cfg_dropout=0.0)
    wav = torch.randn(12000, generator=torch.Generator().manual_seed(0)) * 0.1
    convs = [([("user", ["a dog barks"])], "audio"), ([("user", ["rain falling on a tin roof at night"])], "auto"),
             ([("user", [AudioIn(wav), "\nwhat is it?"])], "text")]
    out = []
    for k, (conv, mode) in enumerate(convs):
        prompt, features = fmt.conversation_prompt(conv)
        out.append(Request(prompt=prompt, audio_features=features, mode=mode, seed=k))
    return out


def _gathered(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """A vocab-parallel table's full [rows, h] from every TP rank's shard."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    shards = [torch.empty_like(weight) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(shards, weight.contiguous(), group=group)
    return torch.cat(shards)[:rows]


def _decoding(tp: int, head: str) -> dict:
    from ualm_nemo.inference.backends import RecomputeBackend
    from ualm_nemo.inference.engine import GenerationConfig
    from ualm_nemo.inference.generate import make_decoder
    from ualm_nemo.inference.megatron_backend import MegatronBackend, megatron_full_forward
    from ualm_nemo.model import stream_math

    model, cfg = _model(tp, head=head)
    v = cfg.vocab
    requests = _requests(cfg)
    prompts = [r.prompt for r in requests]
    features = [r.audio_features for r in requests]
    pad_row = torch.tensor(v.text_position_streams(v.pad_id))
    cached, full = MegatronBackend(model, len(prompts), 64), RecomputeBackend(megatron_full_forward(model), pad_row,
                                                                              torch.device("cpu"))
    diffs = []
    with torch.no_grad():
        pairs = [(cached.prefill(prompts, features), full.prefill(prompts, features))]
        for k in range(6):  # text positions, then audio grid rows
            ids = torch.tensor(v.text_position_streams(65 + k)) if k < 3 else \
                v.codes_to_ids(torch.tensor([(k * 7 + n) % 1024 if n <= k - 3 else 1024 for n in range(8)]))
            ids = ids.expand(len(prompts), 1, -1)
            pairs.append((cached.step(ids), full.step(ids)))
        diffs = [max(float((a - b).abs().max()) for a, b in zip(x, y)) for x, y in pairs]
        # oracle: the single-device reference math on the gathered weights
        hidden = torch.randn(3, 2, cfg.backbone.hidden_size, generator=torch.Generator().manual_seed(5))
        stream0, codebooks = model.heads.logits(hidden)  # [b, s, V], [b, s, N-1, span]
        heads = model.heads
        text_w, audio_w = _gathered(heads.text_head.weight, cfg.num_text_rows), \
            _gathered(heads.audio_head.weight, cfg.num_audio_rows)
        ref0 = stream_math.stream0_logits(hidden.transpose(0, 1), (text_w, audio_w))
        if head == "shared":
            rows = stream_math.shared_codebook_rows(audio_w, v.num_codebooks, v.codebook_span)
            ref_cb = stream_math.codebook_logits(hidden.transpose(0, 1), rows, heads.stream_embedding)
        else:
            ref_cb = stream_math.codebook_logits(hidden.transpose(0, 1), heads.codebook_heads, None)
        emb = model.embedding
        tables = (stream_math.IdTable(_gathered(emb.text.weight, cfg.num_text_rows), 0, v.audio_offset),
                  stream_math.IdTable(_gathered(emb.audio.weight, cfg.num_audio_rows), v.audio_offset, v.size))
        tokens = torch.stack(prompts[:1] * 2)
        ref_emb = stream_math.embed_streams(tokens, tables, v.audio_pad_ids())
        oracle = {"stream0": float((stream0 - ref0).abs().max()), "codebooks": float((codebooks - ref_cb).abs().max()),
                  "embedding": float((emb(tokens).transpose(0, 1) - ref_emb).abs().max())}
    gen = GenerationConfig(max_frames=10, min_frames=4, max_text_tokens=5)
    runs = [make_decoder(model, 259, [], use_cache=c).generate(requests, gen) for c in (True, False)]
    same = all(a.text_ids == b.text_ids and len(a.audio) == len(b.audio)
               and all(torch.equal(x, y) for x, y in zip(a.audio, b.audio)) for a, b in zip(*runs))
    return {"diffs": diffs, "same": same, "oracle": oracle, "kinds": [[s.kind for s in r.segments] for r in runs[0]],
            "codes": [r.audio for r in runs[0]]}


@pytest.mark.parametrize("head", ["shared", "per_codebook"])
def test_kv_cache_equals_recompute_at_tp1_and_tp2(head):
    tp1 = run_distributed(1, _decoding, 1, head)[0]
    tp2 = run_distributed(2, _decoding, 2, head)
    for out in (tp1, tp2[0], tp2[1]):
        assert max(out["diffs"]) < 1e-5, out["diffs"]
        assert out["same"]
        assert max(out["oracle"].values()) < 1e-5, out["oracle"]
    assert tp1["kinds"][0] == ["audio"] and "audio" not in tp1["kinds"][2]
    # every TP rank makes the same choices (logits are gathered; seeds are per request)
    assert all(torch.equal(a, b) for x, y in zip(tp2[0]["codes"], tp2[1]["codes"]) for a, b in zip(x, y))


def _refused_at_pp2() -> str:
    from ualm_nemo.inference.generate import make_decoder

    model, _ = _model(1, pp=2)
    try:
        make_decoder(model, 259, [])
    except ValueError as err:
        return str(err)
    return "accepted"


def test_pipeline_parallel_is_refused_clearly():
    messages = run_distributed(2, _refused_at_pp2)
    assert all("pipeline_model_parallel_size=1" in m for m in messages.values())
