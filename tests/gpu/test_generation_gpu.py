"""GPU only: the decoding loop on CUDA. The HF-side class (bf16 and fp32) and the Megatron model (local spec)
decode a mixed batch with their KV caches; fp32 gives the codes and text of each request decoded alone, and
of the recompute path; sampling stays on the CPU generators, so the same seeds give the same audio as on CPU."""

from __future__ import annotations

import pytest
import torch

from ualm_nemo.testing.dist import run_distributed

pytestmark = pytest.mark.gpu


def _requests(vocab):
    from ualm_nemo.data.formatting import SampleFormatter
    from ualm_nemo.data.tokenizer import ByteChatTokenizer
    from ualm_nemo.inference.engine import Request

    fmt = SampleFormatter(ByteChatTokenizer(), vocab, cfg_dropout=0.0)
    convs = [("a dog barks in a hall", "audio"), ("rain", "audio"), ("hello there", "text"), ("the sea", "auto")]
    return [Request(prompt=fmt.conversation_prompt([("user", [c])])[0], mode=m, seed=k)
            for k, (c, m) in enumerate(convs)]


def _same(a, b) -> bool:
    return a.text_ids == b.text_ids and len(a.audio) == len(b.audio) and \
        all(torch.equal(x, y) for x, y in zip(a.audio, b.audio))


def test_hf_class_decodes_on_cuda():
    from ualm_nemo.inference.engine import GenerationConfig
    from ualm_nemo.inference.generate import make_decoder
    from ualm_nemo.model.config import BACKBONES, AudioInputConfig, UALMConfig
    from ualm_nemo.testing.hf_ualm import random_hf_ualm

    cfg = UALMConfig(backbone=BACKBONES["tiny"], audio_in=AudioInputConfig(enabled=False))
    model = random_hf_ualm(cfg, std=0.05).cuda()
    requests = _requests(cfg.vocab)
    gen = GenerationConfig(max_frames=32, min_frames=8, max_text_tokens=8)
    batch = make_decoder(model, 259, []).generate(requests, gen)
    for request, got in zip(requests, batch):
        assert _same(got, make_decoder(model, 259, []).generate([request], gen)[0])
        assert _same(got, make_decoder(model, 259, [], use_cache=False).generate([request], gen)[0])
    bf16 = make_decoder(model.to(torch.bfloat16), 259, []).generate(requests, gen)
    assert all(r.audio[0].shape[1] == 8 for r in bf16[:2])


def _megatron_on_cuda() -> bool:
    from ualm_nemo.distributed.parallel import init_model_parallel
    from ualm_nemo.inference.engine import GenerationConfig
    from ualm_nemo.inference.generate import make_decoder
    from ualm_nemo.model.builder import build_model
    from ualm_nemo.model.config import BACKBONES, AudioInputConfig, UALMConfig

    cfg = UALMConfig(backbone=BACKBONES["tiny"], audio_in=AudioInputConfig(enabled=False))
    init_model_parallel(cfg.parallel, seed=1)
    model = build_model(cfg).eval()
    requests = _requests(cfg.vocab)
    gen = GenerationConfig(max_frames=32, min_frames=8, max_text_tokens=8)
    cached = make_decoder(model, 259, []).generate(requests, gen)
    full = make_decoder(model, 259, [], use_cache=False).generate(requests, gen)
    return all(_same(a, b) for a, b in zip(cached, full))


def test_megatron_decodes_on_cuda():
    assert run_distributed(1, _megatron_on_cuda)[0]
