"""Sizes of the enhancement VAE and its loss weights; ``tiny`` for tests and CPU trials, ``full`` for real training.

The latent runs at the codec's 50 Hz frame rate: the encoder downsamples 16 kHz by 320, the decoder upsamples by
960 to 48 kHz, so latent frame ``i`` covers exactly codec frame ``i``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from math import prod
from typing import Any, Mapping

from ualm_nemo.model.config import ConfigError
from ualm_nemo.config_types import build_section

INPUT_RATE = 16000
OUTPUT_RATE = 48000
LATENT_RATE = 50


@dataclass
class EnhancerConfig:
    channels: int = 128
    encoder_mults: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    encoder_strides: list[int] = field(default_factory=lambda: [2, 4, 5, 8])  # 320: 16 kHz -> 50 Hz
    decoder_mults: list[int] = field(default_factory=lambda: [16, 8, 4, 2, 1, 1])  # from the latent side
    decoder_strides: list[int] = field(default_factory=lambda: [8, 5, 4, 3, 2])  # 960: 50 Hz -> 48 kHz
    latent_dim: int = 64
    out_channels: int = 2

    def __post_init__(self) -> None:
        if self.channels < 1 or self.latent_dim < 1 or self.out_channels not in (1, 2):
            raise ConfigError(f"enhancer: channels={self.channels}, latent_dim={self.latent_dim} must be >= 1 and "
                              f"out_channels={self.out_channels} 1 or 2")
        if len(self.encoder_mults) != len(self.encoder_strides) + 1:
            raise ConfigError("enhancer: encoder_mults needs one entry more than encoder_strides")
        if len(self.decoder_mults) != len(self.decoder_strides) + 1:
            raise ConfigError("enhancer: decoder_mults needs one entry more than decoder_strides")
        if prod(self.encoder_strides) != INPUT_RATE // LATENT_RATE:
            raise ConfigError(f"enhancer: encoder_strides {self.encoder_strides} multiply to "
                              f"{prod(self.encoder_strides)}, not {INPUT_RATE // LATENT_RATE} (16 kHz -> 50 Hz)")
        if prod(self.decoder_strides) != OUTPUT_RATE // LATENT_RATE:
            raise ConfigError(f"enhancer: decoder_strides {self.decoder_strides} multiply to "
                              f"{prod(self.decoder_strides)}, not {OUTPUT_RATE // LATENT_RATE} (50 Hz -> 48 kHz)")

    @property
    def hop(self) -> int:
        """Input samples per latent frame (320)."""
        return prod(self.encoder_strides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "EnhancerConfig":
        lists = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in values.items()}
        return build_section(cls, lists, "model")


def tiny_config() -> EnhancerConfig:
    """A few thousand parameters: for tests on CPU."""
    return EnhancerConfig(channels=4, encoder_mults=[1, 2, 2, 2, 2], decoder_mults=[2, 2, 2, 2, 1, 1],
                          latent_dim=4)


# What ``model.preset`` sets beyond the model's sizes: the discriminator and the batch, which cost more than the
# tiny VAE itself (full's 32 filters x 5 FFTs at 32 x 1.28 s made a "tiny" step take 30-40 s on CPU; tiny's take
# well under a second). A key given explicitly (not null) wins over its preset.
PRESET_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "full": {"loss": {"discriminator_filters": 32, "discriminator_ffts": [2048, 1024, 512, 256, 128]},
             "train": {"segment_seconds": 1.28, "global_batch_size": 32}},
    "tiny": {"loss": {"discriminator_filters": 4, "discriminator_ffts": [512, 128]},
             "train": {"segment_seconds": 0.16, "global_batch_size": 2}},
}


def with_preset(section: str, values: Mapping[str, Any] | None, preset: str) -> dict[str, Any]:
    """``values`` of ``loss`` or ``train`` with the preset's entries where a key is absent or null."""
    given = dict(values or {})
    defaults = PRESET_DEFAULTS[preset][section]
    return {**defaults, **{k: v for k, v in given.items() if not (k in defaults and v is None)}}


@dataclass
class LossWeights:
    """Defaults: the public Stable Audio / ETTA VAE recipe (adversarial 0.1, feature matching 5.0, MR-STFT 1.0,
    KL 1e-4); mel 1.0 is ours."""

    stft: float = 1.0
    mel: float = 1.0
    adversarial: float = 0.1
    feature_matching: float = 5.0
    kl: float = 1e-4
    spectral_convergence: float = 1.0  # inside the STFT loss; a batch-level ratio (not a mean over samples)
    adversarial_start_step: int = 0  # the discriminator trains and the GAN terms count from this step on
    discriminator_filters: int = 32
    discriminator_ffts: tuple[int, ...] = (2048, 1024, 512, 256, 128)

    def __post_init__(self) -> None:
        self.discriminator_ffts = tuple(self.discriminator_ffts)
        if not self.discriminator_ffts or any(not isinstance(n, int) or n < 16 for n in self.discriminator_ffts):
            raise ConfigError(f"loss.discriminator_ffts={self.discriminator_ffts}: FFT sizes >= 16")
        for f in fields(self):  # types: build_section (config_types); here the ranges
            if f.name != "discriminator_ffts" and not getattr(self, f.name) >= 0:  # NaN fails too
                raise ConfigError(f"loss.{f.name}={getattr(self, f.name)!r}: must be a number >= 0")


@dataclass
class TrainSettings:
    """The enhancer's optimisation (AdamW as the Stable Audio VAE recipe: 1.5e-4 / 3e-4, betas 0.8, 0.99)."""

    data: str = "???"  # a folder of audio files or a Lhotse recordings / cuts manifest
    segment_seconds: float = 1.28  # 64 latent frames
    global_batch_size: int = 32
    max_steps: int = 400_000
    lr: float = 1.5e-4
    disc_lr: float = 3e-4
    betas: tuple[float, float] = (0.8, 0.99)
    weight_decay: float = 1e-3
    ema_decay: float = 0.999
    seed: int = 1234
    num_workers: int = 2
    codec_round_trip: str | None = None  # an X-Codec folder: the input passes encode/decode first
    log_every_n_steps: int = 10
    log_audio_every_n_steps: int = 1000
    checkpoint_every_n_steps: int = 1000
    keep_last_checkpoints: int = 3

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        positive = ("segment_seconds", "global_batch_size", "max_steps", "lr", "disc_lr", "log_every_n_steps",
                    "checkpoint_every_n_steps", "keep_last_checkpoints", "log_audio_every_n_steps")
        for name in positive:  # types: build_section (config_types); here the ranges
            if not getattr(self, name) > 0:
                raise ConfigError(f"train.{name}={getattr(self, name)!r}: must be a number > 0")
        if self.num_workers < 0:
            raise ConfigError(f"train.num_workers={self.num_workers}: must be >= 0")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"train.ema_decay={self.ema_decay}: must be in [0, 1)")
        if self.data in ("???", "", None):
            raise ConfigError("train.data is required: a folder of audio files or a Lhotse manifest")


@dataclass
class EnhancerRun:
    output_dir: str
    model: EnhancerConfig
    loss: LossWeights
    train: TrainSettings

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> "EnhancerRun":
        model = dict(cfg.get("model") or {})
        preset = model.pop("preset", "full")
        if preset not in ("full", "tiny"):
            raise ConfigError(f"enhancer: model.preset={preset!r}: full or tiny")
        base = (tiny_config() if preset == "tiny" else EnhancerConfig()).to_dict()
        return cls(str(cfg.get("output_dir") or "outputs/enhancer"), EnhancerConfig.from_dict({**base, **model}),
                   build_section(LossWeights, with_preset("loss", cfg.get("loss"), preset), "loss"),
                   build_section(TrainSettings, with_preset("train", cfg.get("train"), preset), "train"))
