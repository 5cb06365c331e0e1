"""Suite-wide settings: offline hubs, GPU-marked tests skipped (with the reason) where CUDA is absent, and one
tiny exported UALM for the command tests (a random Qwen2 folder imported to a training checkpoint with random
audio rows and a tiny random audio tower, exported to an HF folder; a tiny X-Codec; a test tone), and the demo
set as Shar sources (training and launcher tests)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from ualm_nemo.testing.dist import run_distributed
from ualm_nemo.testing.tiny_export import import_and_export

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `make test-gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> dict[str, Path]:
    """{"ckpt": training checkpoint, "hf": exported folder, "codec": X-Codec folder, "tone": 1.5 s wav}."""
    from ualm_nemo.codec.xcodec import CodecTokenizer, build_tiny_xcodec

    root = tmp_path_factory.mktemp("tiny_export")
    run_distributed(1, import_and_export, str(root))
    CodecTokenizer(build_tiny_xcodec(0)).save_pretrained(root / "codec")
    wav = (0.2 * np.sin(np.arange(24000) * 2 * np.pi * 440 / 16000)).astype(np.float32)
    soundfile.write(root / "tone.wav", wav, 16000)
    return {"ckpt": root / "ckpt", "hf": root / "hf", "codec": root / "codec", "tone": root / "tone.wav",
            "root": root}


@pytest.fixture(scope="session")
def tiny_enhancer(tmp_path_factory) -> Path:
    """An exported tiny enhancement VAE (random weights, 16 kHz mono -> 48 kHz stereo): the --enhancer folder."""
    from ualm_nemo.enhance.config import tiny_config
    from ualm_nemo.enhance.export import save_enhancer
    from ualm_nemo.enhance.model import EnhancementVAE

    torch.manual_seed(0)
    return save_enhancer(EnhancementVAE(tiny_config()), tmp_path_factory.mktemp("enh") / "enhancer")


@pytest.fixture(scope="session")
def demo_shar(tmp_path_factory) -> dict[str, str]:
    """{task: shar_dir}: the synthetic demo set (tta / understanding / text) as real Shar sources on disk."""
    from ualm_nemo.testing.shar_sources import write_demo_shar

    return write_demo_shar(tmp_path_factory.mktemp("demo_shar"))


@pytest.fixture(scope="module")
def slurm():
    """A real single-node Slurm for the module's tests: started here when absent (installed with apt if need be),
    stopped afterwards only if this module started it; skipped, with the reason, where it cannot exist."""
    from launcher import local_slurm  # the repository's launcher/ (python -m pytest puts the root on sys.path)

    try:
        started = local_slurm.start()
    except local_slurm.SlurmUnavailable as err:
        pytest.skip(f"no Slurm here and it cannot be installed: {err}")
    yield
    local_slurm.stop(started)  # only what this module started
