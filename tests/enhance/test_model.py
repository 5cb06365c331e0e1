"""Shape and rate contract, losses on identical inputs, channel-swap symmetry, KL at the prior, discriminator
shapes, config errors."""

from __future__ import annotations

import pytest
import torch

from ualm_nemo.enhance.config import EnhancerConfig, EnhancerRun, LossWeights, tiny_config
from ualm_nemo.enhance.discriminator import MultiScaleSTFTDiscriminator
from ualm_nemo.enhance.losses import (GeneratorLoss, MultiScaleMelLoss, StereoSTFTLoss, discriminator_hinge,
                                      feature_matching)
from ualm_nemo.enhance.model import EnhancementVAE, gaussian_kl, parameter_count
from ualm_nemo.model.config import ConfigError


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return EnhancementVAE(tiny_config()).eval()


@pytest.mark.parametrize("seconds", [0.2, 1.0, 0.37])
def test_rate_contract(vae, seconds):
    n = int(16000 * seconds)
    out = vae(torch.randn(3, 1, n), noise=None)
    assert out.audio.shape == (3, 2, 3 * n)  # (B, 1, 16k t) -> (B, 2, 48k t)
    assert out.mean.shape == (3, 4, -(-n // 320))  # 50 Hz latent: one frame per codec frame
    assert vae.decode(out.mean).shape[-1] == 960 * out.mean.shape[-1]


def test_odd_and_even_strides_map_lengths_exactly():
    enc = EnhancementVAE(tiny_config()).encoder
    assert enc(torch.randn(1, 1, 320 * 7)).shape[-1] == 7


def test_mono_input_is_required(vae):
    with pytest.raises(ValueError, match="mono"):
        vae(torch.randn(2, 2, 3200))


def test_posterior_noise_changes_output_and_mean_is_deterministic(vae):
    x = torch.randn(1, 1, 3200)
    a, b = vae.enhance(x), vae.enhance(x)
    assert torch.equal(a, b)
    sampled = vae(x, noise=torch.randn(1, 4, 10)).audio
    assert not torch.allclose(sampled, a)


def test_kl_is_zero_at_the_prior_and_positive_elsewhere():
    assert gaussian_kl(torch.zeros(2, 4, 5), torch.ones(2, 4, 5)).item() == pytest.approx(0.0, abs=1e-7)
    # closed form: 0.5 (m^2 + s^2 - ln s^2 - 1) per dim, summed over 4 dims
    m, s = 0.5, 2.0
    expected = 4 * 0.5 * (m ** 2 + s ** 2 - torch.log(torch.tensor(s ** 2)) - 1)
    assert gaussian_kl(torch.full((1, 4, 3), m), torch.full((1, 4, 3), s)).item() == pytest.approx(float(expected))


def test_losses_vanish_on_identical_audio_and_stereo_loss_is_channel_symmetric():
    torch.manual_seed(1)
    x, y = torch.randn(2, 2, 9600), torch.randn(2, 2, 9600)
    stft, mel = StereoSTFTLoss(), MultiScaleMelLoss()
    assert stft(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert mel(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert stft(x, y).item() > 0.5 and mel(x, y).item() > 0.05
    swapped = stft(x.flip(1), y.flip(1)).item()
    assert swapped == pytest.approx(stft(x, y).item(), rel=1e-5)
    # side information counts: the same mid with a different side is penalised
    mid, side = x.mean(1, keepdim=True), x[:, :1] - x[:, 1:]
    other = torch.cat([mid + side, mid - side * 0.2], 1)
    assert stft(other, torch.cat([mid + side, mid - side], 1)).item() > 0.01


def test_discriminator_output_shapes_and_gan_terms():
    disc = MultiScaleSTFTDiscriminator(2, (512, 128), filters=4)
    real, fake = torch.randn(2, 2, 4800), torch.randn(2, 2, 4800)
    lr, lf, fr, ff = disc(real, fake)
    # [B, 1, frames, bins']: frames = 1 + n / hop, bins' = (n_fft / 2 + 1) after three stride-2 convs
    assert [tuple(x.shape) for x in lr] == [(2, 1, 1 + 4800 // 128, 33), (2, 1, 1 + 4800 // 32, 9)]
    assert len(fr) == 2 and len(fr[0]) == 5 and fr[0][0].shape[:2] == (2, 4)
    assert feature_matching(fr, fr).item() == 0.0 and feature_matching(fr, ff).item() > 0
    perfect = [torch.full_like(x, 2.0) for x in lr], [torch.full_like(x, -2.0) for x in lf]
    assert discriminator_hinge(*perfect).item() == 0.0
    total, terms = GeneratorLoss(LossWeights())(fake, real, torch.tensor(0.0), (lr, lf, fr, ff))
    w = LossWeights()
    recomposed = (w.stft * terms["stft"] + w.mel * terms["mel"] + w.adversarial * terms["adversarial"]
                  + w.feature_matching * terms["feature_matching"])
    assert total.item() == pytest.approx(recomposed.item(), rel=1e-6)


def test_full_size_is_the_documented_architecture():
    full = EnhancementVAE(EnhancerConfig())
    assert 140e6 < parameter_count(full) < 160e6  # README: about 149 M
    assert parameter_count(EnhancementVAE(tiny_config())) < 50_000


@pytest.mark.parametrize("values, match", [
    ({"model": {"encoder_strides": [2, 4, 4, 8]}}, "16 kHz -> 50 Hz"),
    ({"model": {"preset": "huge"}}, "preset"),
    ({"model": {"width": 3}}, r"unknown key\(s\) model\.width"),
    ({"loss": {"kl": -1}}, "loss.kl"),
    ({"loss": {"adversarial": float("nan")}}, "loss.adversarial"),
    ({"train": {"data": "x", "max_steps": 0}}, "train.max_steps"),
    ({"train": {"data": "x", "global_batch_size": 2.5}}, "global_batch_size"),
    ({"train": {}}, "train.data is required"),
    ({"train": {"data": "x", "max_steps": "abc"}}, "train.max_steps='abc' must be a whole number"),
    ({"train": {"data": "x", "num_workers": -1}}, "train.num_workers"),
])
def test_config_errors_name_the_key(values, match):
    with pytest.raises(ConfigError, match=match):
        EnhancerRun.from_dict(values)


# what the enhancer tests train with (tests/enhance/test_training.py and the command tests): the tiny preset
TEST_DISCRIMINATOR = {"discriminator_filters": 4, "discriminator_ffts": (512, 128)}


def test_tiny_preset_carries_the_test_settings_through_the_yaml():
    """``model.preset=tiny`` on conf/enhancer.yaml as train_enhancer.py composes it: the tests' discriminator, a
    short segment and batch (no timing here: the sizes that make a step take well under a second on CPU)."""
    from launcher.validate import compose_run

    tiny = EnhancerRun.from_dict(compose_run(["model.preset=tiny", "train.data=x"], "enhancer"))
    assert {k: getattr(tiny.loss, k) for k in TEST_DISCRIMINATOR} == TEST_DISCRIMINATOR
    assert (tiny.train.segment_seconds, tiny.train.global_batch_size) == (0.16, 2)
    disc = MultiScaleSTFTDiscriminator(2, tiny.loss.discriminator_ffts, tiny.loss.discriminator_filters)
    assert (parameter_count(EnhancementVAE(tiny.model)), parameter_count(disc)) == (17372, 3900)
    full = EnhancerRun.from_dict(compose_run(["train.data=x"], "enhancer"))
    assert (full.loss.discriminator_filters, full.loss.discriminator_ffts) == (32, (2048, 1024, 512, 256, 128))
    assert (full.train.segment_seconds, full.train.global_batch_size) == (1.28, 32)
    assert full.loss == LossWeights()  # the yaml's full preset is the dataclass defaults
    given = EnhancerRun.from_dict(compose_run(["model.preset=tiny", "train.data=x", "loss.discriminator_filters=8",
                                               "train.global_batch_size=4"], "enhancer"))
    assert (given.loss.discriminator_filters, given.train.global_batch_size) == (8, 4)  # a given key wins
