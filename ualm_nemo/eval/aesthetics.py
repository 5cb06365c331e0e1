"""AudioBox Aesthetics: CE / CU / PC / PQ (content enjoyment / usefulness, production complexity / quality).

Protocol (audiobox_aesthetics 0.0.4 ``AesPredictor``, used as the library is, fed tensors): mono (channel mean)
after torchaudio resampling to 16 kHz; 10 s chunks every 10 s, the last one zero-padded with its padding masked;
each chunk's four predictions de-normalised with the checkpoint's target statistics and averaged with weights
equal to the chunk's length / 10 s. A set's figure per axis is the mean over clips.

The library silently downloads from a hub when its checkpoint path does not exist: the path is checked here
first, and a missing file is an error. The checkpoint is the library's ``checkpoint.pt`` (``state_dict``,
``model_cfg``, ``target_transform``); it is read weights-only.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import numpy as np
import torch

from ualm_nemo.eval.checkpoints import MetricModelError, require_file

AXES = ("CE", "CU", "PC", "PQ")
RATE = 16000
CHUNK_SECONDS = 10


def chunk_weights(samples: int) -> list[float]:
    """The length weights of a 16 kHz clip's chunks (the library's ``make_inference_batch``)."""
    from audiobox_aesthetics.infer import make_inference_batch

    _, _, weights, _ = make_inference_batch([torch.zeros(1, samples)], CHUNK_SECONDS, CHUNK_SECONDS, RATE)
    return weights


class AesScorer:
    """The four aesthetics axes of clips, protocol above."""

    name = "aes"

    def __init__(self, predictor, device: str = "cpu"):
        predictor.model.to(device)
        predictor.device = torch.device(device)
        self.predictor = predictor

    @classmethod
    def load(cls, path: str | Path | None, **kwargs) -> AesScorer:
        path = require_file(path, "--aes")  # before the library: it would fetch from a hub instead
        from audiobox_aesthetics.infer import AesPredictor

        try:
            with _quiet():
                predictor = AesPredictor(checkpoint_pth=str(path), batch_size=1)
        except (KeyError, RuntimeError, TypeError, OSError, ValueError) as err:
            raise MetricModelError(f"--aes {path}: not an audiobox-aesthetics checkpoint ({err})"[:600]) from None
        return cls(predictor, **kwargs)

    def scores(self, wav: np.ndarray, rate: int) -> dict[str, float]:
        """File samples [channels, samples] -> {"CE": .., "CU": .., "PC": .., "PQ": ..}."""
        with _quiet():
            row = self.predictor.forward([{"path": torch.from_numpy(np.ascontiguousarray(wav)),
                                           "sample_rate": rate}])[0]
        return {axis: float(row[axis]) for axis in AXES}


@contextlib.contextmanager
def _quiet():
    logging.disable(logging.INFO)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(logging.NOTSET)
