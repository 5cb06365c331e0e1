"""Random-weight CLAP and AudioBox-Aesthetics checkpoints in their public release formats (CLAP's RoBERTa cut to
one layer and a byte-level vocabulary: its shapes are read off the file). The tests and the post-training demo
score with them; their scores rank nothing, but every code path of a real metric model runs."""

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
