"""Generate audio for captions from a UALM training checkpoint (CPU or one GPU).

  python examples/generate.py --checkpoint demo_out/checkpoints --codec demo_out/codec \
      --caption "a high beep" --caption "white noise" --out-dir generated/

The checkpoint (any TP/PP layout) is read tensor by tensor into the transformers-side UALM class
(``UALMForConditionalGeneration.from_checkpoint``), which decodes with a KV cache.
"""

import argparse
from pathlib import Path

import soundfile
from tqdm import tqdm

import torch

from ualm_nemo.codec.xcodec import CodecTokenizer
from ualm_nemo.inference.hf_model import UALMForConditionalGeneration
from ualm_nemo.data.formatting import SampleFormatter
from ualm_nemo.data.tokenizer import build_tokenizer
from ualm_nemo.distributed.checkpoint import resolve_checkpoint
from ualm_nemo.inference.generate import AudioGenerationConfig, generate_audio_codes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a run's checkpoints/ folder or one iter_* folder")
    parser.add_argument("--codec", required=True, help="local X-Codec folder (HF format)")
    parser.add_argument("--tokenizer", default="byte", help="'byte' or a local Qwen tokenizer folder")
    parser.add_argument("--caption", action="append", required=True)
    parser.add_argument("--out-dir", default="generated")
    defaults = AudioGenerationConfig()
    parser.add_argument("--cfg-scale", type=float, default=defaults.cfg_scale)
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--top-k", type=int, default=defaults.top_k)
    parser.add_argument("--max-frames", type=int, default=defaults.max_frames)
    parser.add_argument("--min-frames", type=int, default=defaults.min_frames)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    iteration = resolve_checkpoint(args.checkpoint)
    model = UALMForConditionalGeneration.from_checkpoint(iteration).to(args.device)
    cfg = model.cfg
    codec = CodecTokenizer.from_pretrained(args.codec)
    formatter = SampleFormatter(build_tokenizer(args.tokenizer), cfg.vocab, cfg_dropout=0.0)
    gen_cfg = AudioGenerationConfig(cfg_scale=args.cfg_scale, temperature=args.temperature, top_k=args.top_k,
                                    max_frames=args.max_frames, min_frames=args.min_frames, seed=args.seed)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, caption in enumerate(tqdm(args.caption, desc="captions", unit="clip")):
        prompt = formatter.tta_prompt(caption)
        codes = generate_audio_codes(model, cfg.vocab, prompt, formatter.unconditional_prompt(prompt.shape[0]),
                                     gen_cfg)
        path = out_dir / f"{i:03d}.wav"
        soundfile.write(path, codec.decode(codes).numpy(), codec.sample_rate)
        print(f"{path}: {codes.shape[0]} frames ({codes.shape[0] / 50:.2f} s) for {caption!r} ({iteration.name})")


if __name__ == "__main__":
    main()
