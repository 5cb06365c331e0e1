"""Random-weight metric models at their real sizes, saved once per session in their public checkpoint formats
(CLAP's RoBERTa cut to one layer and a byte-level vocabulary: its shapes are read off the file), and a few
short wavs (mono and stereo, 16 / 44.1 kHz)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch


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


def save_metric_models(root: Path) -> dict[str, Path]:
    from audiobox_aesthetics.model.aes import AesMultiOutput

    from ualm_nemo.eval import clap_score, openl3_fd, panns, passt_kl

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    paths = {name: root / file for name, file in (
        ("openl3", "torchopenl3_mel256_env_512.pth.tar"), ("passt", "passt-s-f128-p16-s10-ap.476-swa.pt"),
        ("panns", "Cnn14_16k_mAP=0.438.pth"), ("clap", "630k-audioset-fusion-best.pt"), ("aes", "checkpoint.pt"))}
    torch.save(openl3_fd.build_model("env").state_dict(), paths["openl3"])
    torch.save(passt_kl.build_model().net.state_dict(), paths["passt"])  # the release file: the net alone
    torch.save({"model": panns.Cnn14().state_dict(), "iteration": 0}, paths["panns"])
    paths["clap_tokenizer"] = root / "roberta-tokenizer"
    vocab = write_roberta_tokenizer(paths["clap_tokenizer"])
    model, _ = clap_score.build_model({"vocab_size": vocab, "hidden_size": 768, "num_hidden_layers": 1,
                                       "intermediate_size": 256})
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, paths["clap"])
    aes = AesMultiOutput(target_transform={a: {"mean": 5.0, "std": 1.5} for a in ("CE", "CU", "PC", "PQ")})
    config = {k: getattr(aes, k) for k in ("proj_num_layer", "proj_ln", "proj_act_fn", "proj_dropout", "nth_layer",
                                          "use_weighted_layer_sum", "normalize_embed", "output_dim")}
    torch.save({"state_dict": {f"model.{k}": v for k, v in aes.state_dict().items()},
                "model_cfg": config | {"precision": "32"}, "target_transform": aes.target_transform}, paths["aes"])
    return paths


@pytest.fixture(scope="session")
def metric_models(tmp_path_factory) -> dict[str, Path]:
    return save_metric_models(tmp_path_factory.mktemp("metric_models"))


def write_clip(path: Path, seconds: float, rate: int = 16000, channels: int = 1, freq: float = 440.0,
               seed: int = 0) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    wav = 0.3 * np.sin(2 * np.pi * freq * t) + 0.05 * rng.standard_normal(t.shape)
    data = np.stack([wav, 0.5 * wav[::-1]], axis=1) if channels == 2 else wav
    soundfile.write(path, data.astype(np.float32), rate)
    return path
