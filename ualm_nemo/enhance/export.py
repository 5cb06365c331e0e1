"""The enhancer as a folder (``config.json`` + ``model.safetensors``), kept beside the HF folder's weights.

``load_enhancer`` reads either form: an exported folder, or a training run / checkpoint file (its EMA weights by
default, the weights the recipe evaluates and ships).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ualm_nemo.enhance import checkpoints
from ualm_nemo.enhance.config import EnhancerConfig
from ualm_nemo.enhance.model import EnhancementVAE

FORMAT = "ualm_nemo.enhancer"
CONFIG, WEIGHTS = "config.json", "model.safetensors"


def save_enhancer(model: EnhancementVAE, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, folder / WEIGHTS, metadata={"format": FORMAT})
    (folder / CONFIG).write_text(json.dumps({"format": FORMAT, "version": 1, "model": model.config.to_dict(),
                                             "input_rate": 16000, "output_rate": 48000}, indent=2) + "\n")
    return folder


def _checkpoint_file(path: Path) -> Path:
    if path.is_file():
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    files = checkpoints.candidates(root)
    if not files:
        raise FileNotFoundError(f"{path}: neither an exported enhancer folder ({CONFIG} + {WEIGHTS}) nor an "
                                "enhancer run / checkpoints folder with iter_*.ckpt")
    return files[0]


def weights_from_checkpoint(path: str | Path, use_ema: bool = True) -> tuple[EnhancerConfig, dict]:
    file = _checkpoint_file(Path(path))
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"enhancer checkpoint {file} cannot be read ({type(err).__name__}: {err}); "
                         "it may be truncated: use an earlier iter_*.ckpt") from err
    config = EnhancerConfig.from_dict(state["config"]["model"])
    if use_ema:
        weights = {k.removeprefix("module."): v for k, v in state["ema"].items() if k != "n_averaged"}
    else:
        weights = state["vae"]
    return config, weights


def load_enhancer(path: str | Path, use_ema: bool = True) -> EnhancementVAE:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"enhancer {path}: no such file or folder")
    if (path / CONFIG).is_file():
        meta = json.loads((path / CONFIG).read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path / CONFIG}: not an enhancer config (format {meta.get('format')!r})")
        config = EnhancerConfig.from_dict(meta["model"])
        try:
            weights = load_file(path / WEIGHTS)
        except Exception as err:
            raise ValueError(f"enhancer weights {path / WEIGHTS} cannot be read ({type(err).__name__}: {err}); "
                             "export them again") from err
    else:
        config, weights = weights_from_checkpoint(path, use_ema)
    model = EnhancementVAE(config)
    model.load_state_dict(weights)
    return model.eval()
