"""Audio generation speed of the HF-side UALM class: KV-cached decoding against recomputing the sequence.

  .venv/bin/python benchmarks/hf_generation.py                        # tiny shapes, 256 frames
  .venv/bin/python benchmarks/hf_generation.py --model qwen2.5-0.5b --frames 64 --prompt 32

Builds ``UALMForConditionalGeneration`` with random weights for the model config (no export needed: the class
is assembled from a ``transformers.Qwen2ForCausalLM`` and random audio parts), then generates ``--frames``
audio frames with CFG (both rows: conditional and unconditional) twice, in the same process: through
``decode`` (the KV cache: one new position per step) and through the plain forward (the whole sequence every
step, what the Megatron model does). Prints frames/s for each and the ratio; both must give the same codes.
"""

from __future__ import annotations

import argparse
import time

import torch


def build(model_name: str) -> "torch.nn.Module":
    from transformers import Qwen2ForCausalLM

    from ualm_nemo.convert.audio_parts import expected_audio_shapes
    from ualm_nemo.convert.configs import load_model_config
    from ualm_nemo.inference.hf_model import UALMForConditionalGeneration
    from ualm_nemo.convert.qwen2_keymap import qwen2_config_for

    cfg = load_model_config(model_name, ["audio_in.enabled=false", "audio_in.encoder_path=null"])
    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(qwen2_config_for(cfg))
    parts = {k: torch.randn(shape) * 0.02 for k, shape in expected_audio_shapes(cfg).items()}
    return UALMForConditionalGeneration(cfg, lm, parts).eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help="conf/model name (default tiny)")
    p.add_argument("--frames", type=int, default=256, help="audio frames to generate (default 256)")
    p.add_argument("--prompt", type=int, default=64, help="prompt length in positions (default 64)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from ualm_nemo.inference.generate import AudioGenerationConfig, generate_audio_codes

    model = build(args.model)
    vocab = model.vocab
    text = torch.randint(0, 100, (args.prompt - 1,)).tolist() + [vocab.audio_start_id]
    prompt = torch.tensor([vocab.text_position_streams(t) for t in text])
    uncond = torch.tensor([vocab.text_position_streams(vocab.pad_id)] * (args.prompt - 1)
                          + [vocab.text_position_streams(vocab.audio_start_id)])
    gen = AudioGenerationConfig(max_frames=args.frames, min_frames=args.frames, seed=0)
    results = {}
    for name, use_cache in (("kv cache", True), ("recompute", False)):
        start = time.perf_counter()
        codes = generate_audio_codes(model, vocab, prompt, uncond, gen, use_cache=use_cache)
        seconds = time.perf_counter() - start
        results[name] = (codes, seconds)
        print(f"  {name:<10} {codes.shape[0]} frames in {seconds:6.2f} s = {codes.shape[0] / seconds:7.1f} frames/s",
              flush=True)
    same = torch.equal(results["kv cache"][0], results["recompute"][0])
    print(f"{args.model}, prompt {args.prompt}, {args.frames} frames: kv cache is "
          f"{results['recompute'][1] / results['kv cache'][1]:.1f}x faster; same codes: {same}")


if __name__ == "__main__":
    main()
