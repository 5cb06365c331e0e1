"""`make demo` end to end, shortened: synthesise, train, checkpoint, generate a wav, answer a question."""

from __future__ import annotations

import pytest
import soundfile

from ualm_nemo.testing.dist import run_distributed

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]


def _demo(output_dir: str) -> dict:
    import torch

    from ualm_nemo.demo import run_demo
    from ualm_nemo.inference.load import load_for_inference

    result = run_demo(output_dir, max_steps=4)
    trained = result.pop("model").engine.chunks[0].eval()
    tokens = torch.tensor([trained.ualm.vocab.text_position_streams(i) for i in (257, 65, 66, 67)])[None]
    with torch.no_grad():
        expected = trained(tokens)
        loaded, cfg, step = load_for_inference(f"{output_dir}/checkpoints")
        got = loaded(tokens)
    result["reload"] = {"step": step, "same_config": cfg.backbone == trained.ualm.backbone,
                        "max_diff": max(float((a - b).abs().max()) for a, b in zip(expected, got))}
    # the transformers-side class read from the same checkpoint decodes with a KV cache: the same codes
    from ualm_nemo.inference.hf_model import UALMForConditionalGeneration
    from ualm_nemo.data.formatting import SampleFormatter
    from ualm_nemo.data.tokenizer import build_tokenizer
    from ualm_nemo.inference.generate import AudioGenerationConfig, generate_audio_codes

    hf = UALMForConditionalGeneration.from_checkpoint(f"{output_dir}/checkpoints")
    fmt = SampleFormatter(build_tokenizer("byte"), cfg.vocab, cfg_dropout=0.0)
    prompt = fmt.tta_prompt("a high beep")
    uncond = fmt.unconditional_prompt(prompt.shape[0])
    gen = AudioGenerationConfig(max_frames=30, min_frames=10, seed=5)
    codes = [generate_audio_codes(m, cfg.vocab, prompt, uncond, gen) for m in (loaded, hf)]
    result["kv_cache"] = {"frames": int(codes[0].shape[0]), "same_codes": bool(torch.equal(*codes))}
    return {k: str(v) if not isinstance(v, (int, float, dict)) else v for k, v in result.items()}


def test_demo_writes_audio_and_checkpoints(tmp_path):
    out = run_distributed(1, _demo, str(tmp_path))[0]
    wav, rate = soundfile.read(out["wav"])
    assert rate == 16000 and wav.ndim == 1 and len(wav) == out["frames"] * 320 > 0
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "iter_0000004"
    assert any((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    assert out["answer"] is not None and out["answer"]["question"]
    # the checkpoint alone (config included) rebuilds the trained model for generation
    assert out["reload"] == {"step": 4, "same_config": True, "max_diff": 0.0}
    assert out["kv_cache"]["same_codes"] and out["kv_cache"]["frames"] >= 10
