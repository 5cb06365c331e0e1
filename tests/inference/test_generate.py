"""Audio decoding over the delay pattern, CFG mixing and sampling (tiny untrained model, one process)."""

from __future__ import annotations

import torch

from ualm_nemo.inference.sampling import cfg_mix, sample_top_k
from ualm_nemo.testing.dist import run_distributed


def test_cfg_mix_and_top_k():
    cond, uncond = torch.tensor([1.0, 3.0]), torch.tensor([2.0, 1.0])
    assert torch.equal(cfg_mix(cond, uncond, 3.0), torch.tensor([-1.0, 7.0]))
    assert torch.equal(cfg_mix(cond, uncond, 1.0), cond)
    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0]]).repeat(200, 1)
    picks = sample_top_k(logits, temperature=1.0, top_k=2, generator=gen)
    assert set(picks.tolist()) == {1, 2}  # only the top 2 ever sampled
    assert torch.equal(sample_top_k(logits, 0.0, 2, gen), torch.ones(200, dtype=torch.long))  # greedy


def _generate(max_frames: int, seed: int) -> dict:
    from ualm_nemo.data.formatting import SampleFormatter
    from ualm_nemo.data.tokenizer import ByteChatTokenizer
    from ualm_nemo.distributed.parallel import init_model_parallel
    from ualm_nemo.inference.generate import AudioGenerationConfig, generate_audio_codes, generate_text
    from ualm_nemo.model.builder import build_model
    from ualm_nemo.model.config import BACKBONES, AudioInputConfig, UALMConfig

    cfg = UALMConfig(backbone=BACKBONES["tiny"], audio_in=AudioInputConfig(enabled=False))
    init_model_parallel(cfg.parallel, seed=1)
    model = build_model(cfg)
    tok = ByteChatTokenizer()
    fmt = SampleFormatter(tok, cfg.vocab, cfg_dropout=0.0)
    prompt = fmt.tta_prompt("a low hum")
    uncond = fmt.unconditional_prompt(prompt.shape[0])
    gen_cfg = AudioGenerationConfig(max_frames=max_frames, seed=seed)
    codes = generate_audio_codes(model, cfg.vocab, prompt, uncond, gen_cfg)
    again = generate_audio_codes(model, cfg.vocab, prompt, uncond, gen_cfg)
    text = generate_text(model, cfg.vocab, prompt[:-1], {tok.im_end_id}, tok.vocab_size, max_new_tokens=5)
    return {"codes": codes, "again": again, "text": text}


def test_generation_respects_the_grid():
    out = run_distributed(1, _generate, 12, 0)[0]
    codes = out["codes"]
    assert codes.dim() == 2 and codes.shape[1] == 8 and 1 <= codes.shape[0] <= 12
    assert int(codes.min()) >= 0 and int(codes.max()) < 1024  # no pads survive revert_delay
    assert torch.equal(codes, out["again"])  # seeded: reproducible
    assert len(out["text"]) <= 5 and all(0 <= i < 259 for i in out["text"])  # byte tokenizer ids only
