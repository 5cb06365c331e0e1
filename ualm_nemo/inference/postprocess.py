"""Post-processors: what happens to the codec's 16 kHz mono audio before it is delivered.

The 48 kHz stereo enhancement VAE plugs in here (it implements :class:`AudioPostProcessor`):
:func:`load_postprocessor` is the one way every command (``--enhancer``) and the evaluation during training
(``eval.enhancer``) builds it from a path. ``SincResampler`` (ualm_nemo/enhance/baseline.py, re-exported) is
the plain baseline that VAE is measured against: band-limited resampling with the channel duplicated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from ualm_nemo.enhance.baseline import SincResampler  # noqa: F401  (re-exported: the baseline post-processor)

CODEC_RATE = 16000


class AudioPostProcessor(Protocol):
    sample_rate: int  # of the output
    channels: int  # of the output

    def __call__(self, wav: torch.Tensor) -> torch.Tensor:
        """wav [samples] at 16 kHz -> [channels, samples'] at ``sample_rate``."""


def load_postprocessor(path: str | Path, device: str | torch.device = "cpu") -> AudioPostProcessor:
    """The enhancement VAE at ``path`` (an exported folder, an enhancer run or one iter_*.ckpt) on ``device``;
    FileNotFoundError / ValueError (one line) when it cannot be loaded."""
    from ualm_nemo.enhance.inference import Enhancer

    try:
        return Enhancer.from_pretrained(path, device=device)
    except RuntimeError as err:  # load_state_dict: weights of another shape than the config says
        first = [line.strip() for line in str(err).splitlines()[1:] if line.strip()] or [str(err)]
        raise ValueError(f"enhancer {path}: its weights do not fit its config ({first[0][:200]})") from None


def check_postprocessor(path: str | Path) -> None:
    """What :func:`load_postprocessor` needs is there (files and format, weights not read: cheap enough for a
    launch-time config check); FileNotFoundError / ValueError (one line) otherwise."""
    from ualm_nemo.enhance.inference import check_enhancer

    check_enhancer(path)
