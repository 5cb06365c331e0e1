"""What the inference commands share: model / codec / tokenizer flags, generation flags, their validation.

Every flag is checked before anything heavy is loaded; a bad value ends the command with one line naming the
flag (``parser.error``: exit code 2), never a traceback.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ualm_nemo.inference.engine import GenerationConfig, GenerationSettingError

_FLAG_OF = {"cfg_scale": "--cfg-scale", "temperature": "--temperature", "top_k": "--top-k",
            "max_frames": "--max-frames", "min_frames": "--min-frames", "max_text_tokens": "--max-text-tokens"}


def add_model_args(parser: argparse.ArgumentParser, codec_required: bool = False,
                   checkpoint_required: bool = True) -> None:
    parser.add_argument("--checkpoint", required=checkpoint_required,
                        help="a run's checkpoints/ folder, one iter_* folder, or an exported HF folder")
    parser.add_argument("--codec", required=codec_required,
                        help="local X-Codec folder (HF format); without it generated audio is kept as codes only")
    parser.add_argument("--tokenizer", default="byte", help="'byte' or a local Qwen tokenizer folder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda[:N] (default: cuda when there is a GPU)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], help="weights dtype (default: the checkpoint's)")
    parser.add_argument("--batch-size", type=int, default=8, help="conversations decoded together (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-context", type=int, metavar="N",
                        help="context limit in positions (default and at most: the model's max_position_embeddings): "
                             "an input whose prompt plus reply budget exceeds it is refused, never truncated")


def add_enhancer_arg(parser: argparse.ArgumentParser) -> None:
    """``--enhancer``, for the commands that write audio (generate, evaluate tta, chat): load_inference reads it."""
    parser.add_argument("--enhancer", help="enhancement VAE (exported folder, e.g. <hf>/enhancer, or an enhancer "
                        "run): audio is written at 48 kHz stereo instead of the codec's 16 kHz mono")


def add_generation_args(parser: argparse.ArgumentParser) -> None:
    d = GenerationConfig()
    parser.add_argument("--cfg-scale", type=float, default=d.cfg_scale, help=f"CFG scale (default {d.cfg_scale})")
    parser.add_argument("--temperature", type=float, default=d.temperature)
    parser.add_argument("--top-k", type=int, default=d.top_k)
    parser.add_argument("--max-frames", type=int, default=d.max_frames, help="per audio clip, 50 per second")
    parser.add_argument("--min-frames", type=int, default=d.min_frames)
    parser.add_argument("--max-text-tokens", type=int, default=d.max_text_tokens)


def add_shard_arg(parser: argparse.ArgumentParser) -> None:
    from ualm_nemo.inference.shards import SHARD_HELP

    parser.add_argument("--shard", metavar="K/N|slurm", help=SHARD_HELP)


def shard_of(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """``--shard`` as a Shard (None without it); a bad value ends the command naming the flag."""
    from ualm_nemo.inference.shards import parse_shard

    if args.shard is None:
        return None
    try:
        return parse_shard(args.shard)
    except ValueError as err:
        parser.error(f"--shard {err}")


def generation_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> GenerationConfig:
    """The flags as a GenerationConfig; a bad value is reported with its flag name."""
    try:
        return GenerationConfig(**{k: getattr(args, k) for k in _FLAG_OF if hasattr(args, k)})
    except GenerationSettingError as err:
        parser.error(f"{_FLAG_OF.get(err.key, err.key)} {getattr(args, err.key, '')}: {err}")
        raise  # unreachable: parser.error exits


def check_paths(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """The model flags (folders, device, batch size, seed), before anything is loaded."""
    if args.batch_size < 1:
        parser.error(f"--batch-size {args.batch_size}: must be >= 1")
    if args.seed < 0:
        parser.error(f"--seed {args.seed}: must be >= 0")
    if args.max_context is not None and args.max_context < 1:
        parser.error(f"--max-context {args.max_context}: must be >= 1")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device}: not a torch device (cpu, cuda, cuda:1, ...)")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here (use --device cpu)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        parser.error(f"--device {args.device}: there are {torch.cuda.device_count()} GPUs here")
    if not Path(args.checkpoint).exists():
        parser.error(f"--checkpoint {args.checkpoint}: no such checkpoint or HF folder")
    if args.codec is not None and not (Path(args.codec) / "config.json").is_file():
        parser.error(f"--codec {args.codec}: not an X-Codec folder (no config.json)")
    if args.tokenizer != "byte" and not Path(args.tokenizer).is_dir():
        parser.error(f"--tokenizer {args.tokenizer}: not a tokenizer folder (or 'byte')")
    if getattr(args, "enhancer", None) and args.codec is None:
        parser.error("--enhancer needs --codec: it enhances the decoded 16 kHz audio")


def load_inference(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """-> UALMInference over the model of ``--checkpoint`` (its audio through ``--enhancer`` when the command
    has that flag and it is given); a load failure ends with one line naming the flag. The small parts load
    first, so a bad --enhancer, --tokenizer or --codec does not wait for the model."""
    from ualm_nemo.codec.xcodec import CodecTokenizer
    from ualm_nemo.data.tokenizer import build_tokenizer
    from ualm_nemo.inference.pipeline import UALMInference, load_model
    from ualm_nemo.inference.postprocess import load_postprocessor

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(args.dtype or "")
    flag = "--enhancer"
    try:
        postprocess = load_postprocessor(args.enhancer, args.device) if getattr(args, "enhancer", None) else None
        flag = "--tokenizer"
        tokenizer = build_tokenizer(args.tokenizer)
        flag = "--codec"
        codec = CodecTokenizer.from_pretrained(args.codec).to(args.device) if args.codec else None
        flag = "--checkpoint"
        model = load_model(args.checkpoint, args.device, dtype)
        flag = "--checkpoint/--tokenizer"  # vocabularies that do not fit together
        return UALMInference(model, tokenizer, codec, postprocess, batch_size=args.batch_size,
                             max_context=args.max_context)
    except (FileNotFoundError, ValueError, OSError) as err:
        parser.error(f"{flag}: cannot load: {err}")


def audio_format(infer, enhancer: str | None = None) -> dict:
    """What the written audio is, for chat transcripts: {"sample_rate", "channels", "enhancer"}
    (the enhancer's resolved path or None; rate and channels None without a codec: codes only)."""
    post, codec = infer.postprocess, infer.codec
    rate = post.sample_rate if post is not None else codec.sample_rate if codec is not None else None
    channels = post.channels if post is not None else 1 if codec is not None else None
    return {"sample_rate": rate, "channels": channels, "enhancer": enhancer and str(Path(enhancer).resolve())}
