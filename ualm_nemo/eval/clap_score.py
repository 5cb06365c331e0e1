"""CLAP score: cosine of LAION-CLAP text and audio embeddings (stable-audio-metrics' protocol).

Protocol (SAM ``clap_score``, laion_clap 1.1.5, ``630k-audioset-fusion-best.pt``): HTSAT-tiny audio branch with
feature fusion (``aff_2d``), RoBERTa text branch. Audio: mono (channel mean) resampled to 48 kHz as
``librosa.load(sr=48000)`` does (soxr HQ, then ceil(n * 48000 / rate) samples: 5 s at 44.1 kHz gives 240001,
which moves laion_clap's repeat padding), peak-normalised to -1 dBFS, int16 round trip; clips over 10 s take
the fusion input (the whole clip shrunk + three random 10 s crops: their draws are seeded per clip with ``seed``,
so a score is reproducible), shorter ones are repeat-padded to 10 s. Text: the prompt, RoBERTa-tokenised to 77
tokens. Score per clip: cosine similarity of the two (normalised) embeddings; the set's CLAP score is the mean
over clips.

Offline: laion_clap builds its RoBERTa with ``from_pretrained('roberta-base')`` and its tokenizer likewise (hub
fetches). Here the RoBERTa is built from a config read off the checkpoint's own tensors (layers, width, vocab:
roberta-base for the released files) while the CLAP module is constructed, and the tokenizer comes from a local
folder (``--clap-tokenizer``: a roberta-base tokenizer, vocab.json + merges.txt). The checkpoint's
``text_branch.embeddings.position_ids`` buffer is dropped (LAION-CLAP issue 118, as SAM does).
"""

from __future__ import annotations

import contextlib
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ualm_nemo.eval import audio_prep
from ualm_nemo.eval.checkpoints import MetricModelError, load_strict, load_weights, require_file

RATE = 48000
CLIP_SAMPLES = 480000
CONTEXT = 77
ROBERTA_BASE = {"vocab_size": 50265, "hidden_size": 768, "num_hidden_layers": 12, "intermediate_size": 3072}


def roberta_shape(state: dict[str, Any]) -> dict[str, int]:
    """The text branch's RoBERTa sizes as the checkpoint's tensors give them."""
    try:
        vocab, hidden = state["text_branch.embeddings.word_embeddings.weight"].shape
        layers = 1 + max(int(m.group(1)) for k in state
                         if (m := re.match(r"text_branch\.encoder\.layer\.(\d+)\.", k)))
        inter = state["text_branch.encoder.layer.0.intermediate.dense.weight"].shape[0]
    except (KeyError, ValueError) as err:
        raise MetricModelError(f"not a LAION-CLAP RoBERTa checkpoint (no {err})") from None
    return {"vocab_size": int(vocab), "hidden_size": int(hidden), "num_hidden_layers": layers,
            "intermediate_size": int(inter)}


def import_laion_clap() -> None:
    """Import laion_clap once. Its ``training.data`` parses ``sys.argv`` at import time (and exits on flags it
    does not know, such as ours or pytest's): it is shown the program name only."""
    if "laion_clap" in sys.modules:
        return
    argv = sys.argv
    sys.argv = argv[:1]
    try:
        import laion_clap  # noqa: F401  (also puts laion_clap's own top-level modules on the import path)
        import laion_clap.training.data  # noqa: F401
    finally:
        sys.argv = argv


@contextlib.contextmanager
def _roberta_from_config(shape: dict[str, int]):
    """While laion_clap builds CLAP, ``RobertaModel.from_pretrained(...)`` builds a random RoBERTa of ``shape``
    (roberta-base's fixed settings: 514 positions, one token type, LayerNorm eps 1e-5) instead of fetching."""
    import_laion_clap()
    from laion_clap.clap_module import model as clap_model
    from transformers import RobertaConfig, RobertaModel

    class _FromConfig:
        @staticmethod
        def from_pretrained(*_args, **_kwargs):
            config = RobertaConfig(**shape, num_attention_heads=shape["hidden_size"] // 64,
                                   max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5)
            return RobertaModel(config)

    original = clap_model.RobertaModel
    clap_model.RobertaModel = _FromConfig
    try:
        yield
    finally:
        clap_model.RobertaModel = original


def build_model(shape: dict[str, int] | None = None) -> tuple[torch.nn.Module, dict]:
    """Random-weight fusion CLAP (HTSAT-tiny + RoBERTa of ``shape``, default roberta-base) and its config."""
    import_laion_clap()
    from laion_clap.clap_module.factory import create_model

    with _roberta_from_config(shape or ROBERTA_BASE):
        model, config = create_model("HTSAT-tiny", "roberta", precision="fp32", device="cpu", enable_fusion=True,
                                     fusion_type="aff_2d")
    return model.eval(), config


class ClapScorer:
    """CLAP text and audio embeddings, protocol above."""

    name = "clap"

    def __init__(self, model: torch.nn.Module, config: dict, tokenizer, device: str = "cpu", seed: int = 0):
        self.model, self.config, self.tokenizer = model.to(device).eval(), config, tokenizer
        self.device, self.seed = device, seed

    @classmethod
    def load(cls, path: str | Path | None, tokenizer: str | Path | None, **kwargs) -> ClapScorer:
        path = require_file(path, "--clap")
        if tokenizer is None or not (Path(tokenizer) / "vocab.json").is_file():
            raise MetricModelError(f"--clap-tokenizer {tokenizer}: not a local RoBERTa tokenizer folder "
                                   "(vocab.json + merges.txt of roberta-base)")
        from transformers import RobertaTokenizer

        state = load_weights(path, "--clap", key="state_dict")
        state.pop("text_branch.embeddings.position_ids", None)
        try:
            shape = roberta_shape(state)
        except MetricModelError as err:
            raise MetricModelError(f"--clap {path}: {err}") from None
        model, config = build_model(shape)
        load_strict(model, state, path, "--clap")
        return cls(model, config, RobertaTokenizer.from_pretrained(str(tokenizer)), **kwargs)

    @staticmethod
    def prepare(wav: np.ndarray, rate: int) -> np.ndarray:
        """File samples -> [samples] at 48 kHz: mono, peak-normalised, int16 round trip."""
        wav = audio_prep.peak_normalise(audio_prep.resample(audio_prep.mono(wav), rate, RATE, "librosa"))
        return audio_prep.int16_round_trip(wav)[0]

    def features(self, wav: np.ndarray, rate: int) -> dict[str, torch.Tensor]:
        """laion_clap's input dict of one clip (fusion mel or repeat-padded 10 s), crops drawn from ``seed``."""
        import_laion_clap()
        from laion_clap.training.data import get_audio_features

        state = np.random.get_state()
        np.random.seed(self.seed)  # laion_clap draws the fusion crops from numpy's global generator
        try:
            return get_audio_features({}, torch.from_numpy(self.prepare(wav, rate)), CLIP_SAMPLES,
                                      data_truncating="fusion", data_filling="repeatpad",
                                      audio_cfg=self.config["audio_cfg"])
        finally:
            np.random.set_state(state)

    @torch.no_grad()
    def audio_embedding(self, wav: np.ndarray, rate: int) -> np.ndarray:
        return self.model.get_audio_embedding([self.features(wav, rate)])[0].double().cpu().numpy()

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> np.ndarray:
        tokens = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=CONTEXT,
                                return_tensors="pt")
        data = {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
        return self.model.get_text_embedding(data).double().cpu().numpy()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity with torch's eps (1e-8), as SAM computes it."""
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-8))
