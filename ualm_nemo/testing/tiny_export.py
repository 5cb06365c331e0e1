"""A tiny exported UALM for the command tests: a random Qwen2 folder imported to a training checkpoint (random
audio rows, the tiny random audio tower) and exported to an HF folder, through the real converter commands.

A module of the package (not of a conftest) so the spawned worker that runs it can import it by name.
"""

from __future__ import annotations

from pathlib import Path

from ualm_nemo.testing.examples import load_example
from ualm_nemo.testing.hf_folders import make_hf_folder


def import_and_export(root: str) -> None:
    """Writes ``root/qwen``, ``root/ckpt`` (training checkpoint) and ``root/hf`` (exported folder). Run it in its
    own process (``testing.dist.run_distributed``): the converters initialise torch.distributed and the CPU shim."""
    r = Path(root)
    make_hf_folder(r / "qwen")
    if load_example("convert_hf_to_ualm").main([str(r / "qwen"), str(r / "ckpt"), "--model", "tiny",
                                                "--new-rows-init", "normal", "--no-progress"]) != 0:
        raise RuntimeError("import of the tiny Qwen2 folder failed")
    if load_example("convert_ualm_to_hf").main([str(r / "ckpt"), str(r / "hf"), "--no-progress"]) != 0:
        raise RuntimeError("export of the tiny checkpoint failed")
