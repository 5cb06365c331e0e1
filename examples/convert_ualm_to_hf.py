r"""Export a UALM checkpoint (saved at any TP/PP) to a Hugging Face folder.

    python examples/convert_ualm_to_hf.py /results/ualm/checkpoints /models/ualm-7b-hf --model qwen2.5-7b \
        --set audio_in.encoder_path=/models/Qwen2.5-Omni-7B --tokenizer /models/Qwen2.5-7B-Instruct --dtype bf16

The folder holds a Qwen2ForCausalLM (config.json + safetensors: transformers.AutoModelForCausalLM loads it and
generates text), audio.safetensors, audio_encoder/, ualm_config.json and the tokenizer files;
ualm_nemo.inference.hf_model.UALMForConditionalGeneration loads all of it. The checkpoint argument is a run's
checkpoint folder (its ``latest`` is used), one iter_* folder, or a ``.nemo`` archive written by
``UALMModel.save_to`` (its ``model_weights/`` folder is such an iteration folder). --model may be left out for
checkpoints that record their config (imports and archives do). The folder is written as <out>.tmp-<pid> and
renamed when complete.
"""

import argparse
import contextlib
import logging
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="checkpoint root (with 'latest'), an iter_* folder, or a .nemo archive "
                   "(UALMModel.save_to)")
    p.add_argument("out", help="HF folder to create")
    p.add_argument("--model", help="conf/model name, a model YAML or a ualm_config.json")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="model-config override")
    p.add_argument("--tokenizer", help="folder whose tokenizer files are copied, or 'byte' (default: the run's "
                   "data.tokenizer, which training records; for an import, its HF source)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="dtype of the written weights (default: the model's params_dtype)")
    p.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB, 500MB (default 5GB)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ualm_nemo.convert.configs import load_model_config
    from ualm_nemo.convert.exporter import export_hf_checkpoint, parse_size, prepare_export
    from ualm_nemo.model.config import ConfigError

    from ualm_nemo.training.nemo_archive import archive_weights, is_nemo_archive

    try:
        cfg = load_model_config(args.model, args.set) if args.model else None
        max_shard = parse_size(args.max_shard_size)
        with contextlib.ExitStack() as stack:
            # a .nemo holds an iteration folder (model_weights/): unpacked, it exports as any checkpoint
            ckpt = stack.enter_context(archive_weights(args.checkpoint)) if is_nemo_archive(args.checkpoint) \
                else args.checkpoint
            prepare_export(ckpt, args.out, cfg, args.tokenizer, args.dtype, args.overwrite)  # fail early
            from ualm_nemo.distributed.parallel import init_distributed

            init_distributed()
            out = export_hf_checkpoint(ckpt, args.out, cfg, tokenizer_dir=args.tokenizer, dtype=args.dtype,
                                       max_shard_bytes=max_shard, overwrite=args.overwrite,
                                       progress=not args.no_progress)
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    logging.info("wrote %s", out)
    return 0


if __name__ == "__main__":  # required: megatron's checkpoint writer starts a helper that re-imports this module
    sys.exit(main())
