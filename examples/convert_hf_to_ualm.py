r"""Import a Qwen2.5 HF folder into a UALM distributed checkpoint (model weights, step 0), loadable at any TP/PP.

    python examples/convert_hf_to_ualm.py /models/Qwen2.5-7B-Instruct /ckpts/ualm-7b-init --model qwen2.5-7b \
        --audio-encoder /models/Qwen2.5-Omni-7B --tensor-parallel 4 --pipeline-parallel 2

Without --model the backbone is read from the HF config.json (audio parts at their defaults). --set takes
model-config overrides (``audio_out.head=per_codebook``). A UALM export (examples/convert_ualm_to_hf.py) imports
whole: its ualm_config.json is the model config when --model is left out, its audio.safetensors gives the audio
rows, heads and adapter, and its audio_encoder/ the tower (unless --audio-encoder names another); an
audio.safetensors that does not fit the config is refused with the entries that are wrong. --tensor/--pipeline-parallel only check that the
layout you will train at divides the model: the checkpoint itself reshards on load to any layout.
Memory: one tensor in flight (at most the text embedding table), never the model; see ualm_nemo/convert/importer.py.
"""

import argparse
import logging
import sys
from dataclasses import replace


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("hf_dir", help="HF Qwen2/Qwen2.5 folder (config.json + *.safetensors)")
    p.add_argument("out", help="checkpoint root to create (iter_0000000/ and latest are written in it)")
    p.add_argument("--model", help="conf/model name, a model YAML or a ualm_config.json (default: from config.json)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="model-config override")
    p.add_argument("--audio-encoder",
                   help="Qwen2.5-Omni, Audio Flamingo 3 (AF-Whisper) or encoder-only folder for the audio encoder")
    p.add_argument("--no-audio-input", action="store_true", help="model.audio_in.enabled=false")
    p.add_argument("--params-dtype", choices=["fp32", "bf16"], help="override model.params_dtype")
    p.add_argument("--new-rows-init", choices=["mean", "normal"], default="mean",
                   help="specials and audio rows: mean of the text rows (default) or N(0, init_std)")
    p.add_argument("--tensor-parallel", type=int, default=1, help="layout to check the model against")
    p.add_argument("--pipeline-parallel", type=int, default=1, help="layout to check the model against")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def model_config(args):
    import json
    from pathlib import Path

    from ualm_nemo.convert.audio_parts import export_config, with_export_encoder
    from ualm_nemo.convert.configs import backbone_from_hf_config, load_model_config
    from ualm_nemo.convert.importer import with_encoder
    from ualm_nemo.model.config import AudioInputConfig, UALMConfig

    exported = export_config(args.hf_dir)  # a UALM export records its whole model config
    if args.model:
        cfg = load_model_config(args.model, args.set)
    else:
        config_file = Path(args.hf_dir) / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"HF folder {args.hf_dir} has no config.json")
        backbone = backbone_from_hf_config(json.loads(config_file.read_text()))
        cfg = exported or UALMConfig(backbone=backbone, audio_in=AudioInputConfig(enabled=False))
        if args.set:
            from omegaconf import OmegaConf

            from ualm_nemo.convert.configs import config_to_dict

            merged = OmegaConf.merge(OmegaConf.create(config_to_dict(cfg)), OmegaConf.from_dotlist(args.set))
            cfg = UALMConfig.from_dict(OmegaConf.to_container(merged))
    cfg = with_encoder(cfg, args.audio_encoder) if args.audio_encoder else with_export_encoder(cfg, args.hf_dir)
    if args.no_audio_input:
        cfg = replace(cfg, audio_in=replace(cfg.audio_in, enabled=False))
    if args.params_dtype:
        cfg = replace(cfg, params_dtype=args.params_dtype)
    return cfg


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ualm_nemo.convert.importer import check_import, import_hf_checkpoint
    from ualm_nemo.model.config import ConfigError

    try:
        cfg = model_config(args)
        check_import(args.hf_dir, cfg, (args.tensor_parallel, args.pipeline_parallel))  # fail before heavy work
        from ualm_nemo.distributed.parallel import init_distributed

        init_distributed()
        path = import_hf_checkpoint(args.hf_dir, args.out, cfg, new_rows_init=args.new_rows_init,
                                    target_layout=(args.tensor_parallel, args.pipeline_parallel),
                                    overwrite=args.overwrite, progress=not args.no_progress)
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    logging.info("wrote %s", path)
    return 0


if __name__ == "__main__":  # required: megatron's checkpoint writer starts a helper that re-imports this module
    sys.exit(main())
