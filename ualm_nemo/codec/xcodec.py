"""X-Codec (transformers ``XcodecModel``): 16 kHz audio <-> 8 RVQ codebooks x 1024 at 50 Hz (hop 320, 4 kbps).

Weights come only from a local folder (``load_xcodec``); tests and the demo build a tiny random codec
(``build_tiny_xcodec``). HF's init leaves the codebooks at zero (every code would be 0), so the tiny codec fills
them from a seeded generator.

Frame count: ``num_codec_frames(n) = round_half_up(n / 320)``, the rounding lhotse uses to crop temporal arrays
(``compute_num_frames``), so tokens computed here survive a Shar round trip unchanged. XcodecModel's own count
for an arbitrary length rounds differently (it pads by hop/2 for its HuBERT branch), so each clip is first
zero-padded or cropped (< 160 samples) to exactly ``frames * 320`` samples; at a multiple of the hop the model
emits exactly ``n / 320`` frames with no internal padding, so a clip's codes do not depend on where its own
length falls. (The semantic branch has no attention mask: in a padded batch, a shorter clip's codes can differ
slightly from encoding it alone. ``max_batch_size=1`` gives exact per-clip codes.)
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import torch
from transformers import XcodecConfig, XcodecModel

SAMPLE_RATE = 16000
HOP_LENGTH = 320  # samples per codec frame -> 50 Hz
BANDWIDTH = 4.0  # kbps; 4.0 selects 8 of the codebooks


def num_codec_frames(num_samples: int) -> int:
    """50 Hz frames for ``num_samples`` at 16 kHz, rounded half-up like lhotse (at least one)."""
    return max((num_samples + HOP_LENGTH // 2) // HOP_LENGTH, 1)


def tiny_xcodec_config() -> XcodecConfig:
    """A 0.33M-parameter X-Codec with the real frame layout (hop 320, 8 x 1024 at 4 kbps)."""
    return XcodecConfig(
        acoustic_model_config=dict(encoder_hidden_size=8, decoder_hidden_size=32, hidden_size=32,
                                   downsampling_ratios=[8, 5, 4, 2], upsampling_ratios=[8, 5, 4, 2]),
        semantic_model_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64, conv_dim=[32] * 7, num_conv_pos_embeddings=16),
    )


def randomize_codebooks(model: XcodecModel, generator: torch.Generator) -> None:
    """Fill every RVQ codebook (``embed``, and its EMA copy ``embed_avg``) with N(0, 1) rows."""
    with torch.no_grad():
        for module in model.modules():
            embed = getattr(module, "embed", None)
            if isinstance(embed, torch.Tensor) and embed.dim() == 2:
                embed.copy_(torch.randn(embed.shape, generator=generator))
                if isinstance(getattr(module, "embed_avg", None), torch.Tensor):
                    module.embed_avg.copy_(embed)


def build_tiny_xcodec(seed: int = 0) -> XcodecModel:
    """Tiny random X-Codec, identical for a given seed; leaves the global torch RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = XcodecModel(tiny_xcodec_config())
    randomize_codebooks(model, torch.Generator().manual_seed(seed))
    return model.eval()


def load_xcodec(path: str | Path) -> XcodecModel:
    """XcodecModel from a local HF folder (config.json + model.safetensors)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"X-Codec folder {str(path)!r} has no config.json: pass a local HF-format X-Codec "
                                "folder (e.g. a copy of hf-audio/xcodec-hubert-general), or write the tiny codec "
                                "with CodecTokenizer.save_pretrained")
    return XcodecModel.from_pretrained(str(path), local_files_only=True).eval()


class CodecTokenizer:
    """Waveforms <-> codec tokens [T, num_codebooks], frame-major as the LM consumes them."""

    def __init__(self, model: XcodecModel, bandwidth: float = BANDWIDTH, max_batch_size: int = 16):
        if model.config.sample_rate != SAMPLE_RATE or model.config.hop_length != HOP_LENGTH:
            raise ValueError(f"codec runs at {model.config.sample_rate} Hz / hop {model.config.hop_length}; "
                             f"UALM expects {SAMPLE_RATE} Hz / hop {HOP_LENGTH}")
        self.model = model.eval()
        self.bandwidth = bandwidth
        self.max_batch_size = max_batch_size
        self.num_codebooks = model.quantizer.get_num_quantizers_for_bandwidth(bandwidth)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kw) -> "CodecTokenizer":
        return cls(load_xcodec(path), **kw)

    def save_pretrained(self, path: str | Path) -> None:
        self.model.save_pretrained(str(path))

    def fingerprint(self) -> str:
        """Hash of everything the codes depend on (weights, bandwidth, batching): a codes cache written with
        another codec is recognised as stale, not reused."""
        digest = hashlib.blake2b(f"{self.bandwidth}:{self.max_batch_size}".encode(), digest_size=16)
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    @property
    def codebook_size(self) -> int:
        return int(self.model.config.codebook_size)

    @property
    def sample_rate(self) -> int:
        return SAMPLE_RATE

    def to(self, device: str | torch.device) -> "CodecTokenizer":
        self.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def encode(self, wavs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """1-D float waveforms at 16 kHz -> LongTensor [num_codec_frames(len), num_codebooks] each, input order.

        Clips are sorted by length so each padded batch wastes little compute, then restored to input order.
        """
        frames = [num_codec_frames(int(w.shape[-1])) for w in wavs]
        for i, w in enumerate(wavs):
            if w.dim() != 1 or w.shape[0] == 0:
                raise ValueError(f"clip {i}: expected a non-empty 1-D waveform, got shape {tuple(w.shape)}")
        order = sorted(range(len(wavs)), key=lambda i: frames[i])
        out: list[torch.Tensor | None] = [None] * len(wavs)
        for b in range(0, len(order), self.max_batch_size):
            idx = order[b:b + self.max_batch_size]
            max_len = frames[idx[-1]] * HOP_LENGTH
            batch = torch.zeros(len(idx), 1, max_len, device=self.device)  # [B, 1, samples]
            for row, i in enumerate(idx):
                clip = wavs[i][: frames[i] * HOP_LENGTH].float()  # crop (< half a hop) to whole frames
                batch[row, 0, : clip.shape[0]] = clip.to(self.device)
            codes = self.model.encode(batch, bandwidth=self.bandwidth, return_dict=True).audio_codes  # [B, N, T]
            for row, i in enumerate(idx):
                out[i] = codes[row, :, : frames[i]].T.long().cpu().contiguous()  # [T_i, N]
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [T, num_codebooks] in [0, codebook_size) -> 1-D float waveform [T * 320] at 16 kHz (CPU)."""
        if codes.dim() != 2 or codes.shape[1] != self.num_codebooks:
            raise ValueError(f"codes must be [T, {self.num_codebooks}], got {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size}); strip delay pads before decoding")
        audio = self.model.decode(codes.T[None].to(self.device), return_dict=True).audio_values  # [1, 1, samples]
        return audio[0, 0, : codes.shape[0] * HOP_LENGTH].float().cpu()
