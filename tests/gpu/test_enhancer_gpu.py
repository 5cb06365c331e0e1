"""On a GPU: the full-size enhancer runs a bf16 training step and enhances faster than real time."""

from __future__ import annotations

import time

import pytest
import torch

from ualm_nemo.enhance.config import EnhancerConfig
from ualm_nemo.enhance.inference import Enhancer
from ualm_nemo.enhance.model import EnhancementVAE

pytestmark = pytest.mark.gpu


def test_full_size_bf16_inference_is_faster_than_real_time_and_matches_fp32():
    torch.manual_seed(0)
    model = EnhancementVAE(EnhancerConfig()).cuda()
    wav = torch.randn(1, 1, 16000 * 20) * 0.1
    fp32 = Enhancer(model, device="cuda").enhance(wav[..., :32000])
    enhancer = Enhancer(model, device="cuda", dtype=torch.bfloat16)
    enhancer.enhance(wav[..., :16000])
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = enhancer.enhance(wav)
    torch.cuda.synchronize()
    assert out.shape == (1, 2, 3 * wav.shape[-1]) and torch.isfinite(out).all()
    assert 20.0 / (time.perf_counter() - start) > 1.0
    assert torch.nn.functional.cosine_similarity(out[..., : fp32.shape[-1]].flatten(), fp32.flatten(), 0) > 0.99
