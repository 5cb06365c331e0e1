"""Random-weight metric models at their real sizes, saved once per session in their public checkpoint formats
(CLAP's RoBERTa cut to one layer and a byte-level vocabulary: its shapes are read off the file)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ualm_nemo.testing.metric_models import write_random_aes, write_random_clap


def save_metric_models(root: Path) -> dict[str, Path]:
    from ualm_nemo.eval import openl3_fd, panns, passt_kl

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    paths = {name: root / file for name, file in (
        ("openl3", "torchopenl3_mel256_env_512.pth.tar"), ("passt", "passt-s-f128-p16-s10-ap.476-swa.pt"),
        ("panns", "Cnn14_16k_mAP=0.438.pth"), ("clap", "630k-audioset-fusion-best.pt"), ("aes", "checkpoint.pt"))}
    torch.save(openl3_fd.build_model("env").state_dict(), paths["openl3"])
    torch.save(passt_kl.build_model().net.state_dict(), paths["passt"])  # the release file: the net alone
    torch.save({"model": panns.Cnn14().state_dict(), "iteration": 0}, paths["panns"])
    paths.update(write_random_clap(root))
    write_random_aes(paths["aes"])
    return paths


@pytest.fixture(scope="session")
def metric_models(tmp_path_factory) -> dict[str, Path]:
    return save_metric_models(tmp_path_factory.mktemp("metric_models"))
