"""Random-weight metric checkpoints (OpenL3, PaSST, PANNs, CLAP, AudioBox-Aesthetics) in their public release
formats and file names (CLAP's RoBERTa cut to one layer and a byte-level vocabulary: its shapes are read off the
file). The tests, the post-training demo and examples/make_random_metric_checkpoints.py (``evaluate.py tta`` tried
on a laptop before the real files are fetched) score with them; their scores rank nothing, but every code path
of a real metric model runs."""

from __future__ import annotations

import json
from pathlib import Path

import torch

AES_AXES = ("CE", "CU", "PC", "PQ")


def write_roberta_tokenizer(folder: Path) -> int:
    """A byte-level BPE vocabulary (specials + the 256 byte symbols, no merges) in roberta-base's file layout;
    returns its size."""
    from tokenizers.pre_tokenizers import ByteLevel

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for symbol in ByteLevel.alphabet():
        vocab.setdefault(symbol, len(vocab))
    vocab["<mask>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return len(vocab)


def write_random_clap(root: Path) -> dict[str, Path]:
    """-> {"clap": 630k-audioset-fusion-best.pt, "clap_tokenizer": roberta-tokenizer/} under ``root``."""
    from ualm_nemo.eval import clap_score

    root.mkdir(parents=True, exist_ok=True)
    paths = {"clap": root / "630k-audioset-fusion-best.pt", "clap_tokenizer": root / "roberta-tokenizer"}
    vocab = write_roberta_tokenizer(paths["clap_tokenizer"])
    model, _ = clap_score.build_model({"vocab_size": vocab, "hidden_size": 768, "num_hidden_layers": 1,
                                       "intermediate_size": 256})
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, paths["clap"])
    return paths


def write_random_aes(path: Path) -> Path:
    """An audiobox-aesthetics checkpoint.pt (four axes, scores around 5 of 10)."""
    from audiobox_aesthetics.model.aes import AesMultiOutput

    path.parent.mkdir(parents=True, exist_ok=True)
    aes = AesMultiOutput(target_transform={a: {"mean": 5.0, "std": 1.5} for a in AES_AXES})
    config = {k: getattr(aes, k) for k in ("proj_num_layer", "proj_ln", "proj_act_fn", "proj_dropout", "nth_layer",
                                          "use_weighted_layer_sum", "normalize_embed", "output_dim")}
    torch.save({"state_dict": {f"model.{k}": v for k, v in aes.state_dict().items()},
                "model_cfg": config | {"precision": "32"}, "target_transform": aes.target_transform}, path)
    return path


# evaluate.py tta flag -> the release file name (the real checkpoints' names, so the flags read the same)
METRIC_FILES = {"openl3": "torchopenl3_mel256_env_512.pth.tar", "passt": "passt-s-f128-p16-s10-ap.476-swa.pt",
                "panns": "Cnn14_16k_mAP=0.438.pth", "clap": "630k-audioset-fusion-best.pt", "aes": "checkpoint.pt"}
RANDOM_NOTE = "RANDOM_WEIGHTS.txt"


def write_random_metric_models(root: Path, seed: int = 0) -> dict[str, Path]:
    """Every metric model ``evaluate.py tta`` takes, random weights at the real sizes, under ``root``, plus
    ``RANDOM_WEIGHTS.txt`` saying so. -> {flag name: path} (``clap_tokenizer`` too)."""
    from ualm_nemo.eval import openl3_fd, panns, passt_kl

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    paths = {name: root / file for name, file in METRIC_FILES.items()}
    torch.save(openl3_fd.build_model("env").state_dict(), paths["openl3"])
    torch.save(passt_kl.build_model().net.state_dict(), paths["passt"])  # the release file: the net alone
    torch.save({"model": panns.Cnn14().state_dict(), "iteration": 0}, paths["panns"])
    paths.update(write_random_clap(root))
    write_random_aes(paths["aes"])
    (root / RANDOM_NOTE).write_text(
        "These metric checkpoints hold RANDOM weights (examples/make_random_metric_checkpoints.py): they load and\n"
        "run like the real ones, so evaluate.py tta can be tried end to end, but every score they give is\n"
        "meaningless. Score with the released checkpoints (README, Evaluation) for figures to report.\n\n"
        f"evaluate.py tta flags:\n  {' '.join(evaluate_flags(paths))}\n")
    return paths


def evaluate_flags(paths: dict[str, Path]) -> list[str]:
    """The ``evaluate.py tta`` metric-model flags for ``paths`` (as ``write_random_metric_models`` returns)."""
    flags = [a for name in METRIC_FILES if name in paths for a in (f"--{name}", str(paths[name]))]
    return flags + (["--clap-tokenizer", str(paths["clap_tokenizer"])] if "clap" in paths else [])
