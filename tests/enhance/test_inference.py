"""Chunked enhancement equals unchunked (no seams), the exported folder round-trips, metrics know their answers."""

from __future__ import annotations

import pytest
import torch

from ualm_nemo.enhance.config import tiny_config
from ualm_nemo.enhance.data import to_input, to_target
from ualm_nemo.enhance.export import load_enhancer, save_enhancer
from ualm_nemo.enhance.inference import Enhancer
from ualm_nemo.enhance.metrics import low_band_consistency, lsd, mrstft_distance
from ualm_nemo.enhance.model import EnhancementVAE
from ualm_nemo.inference.postprocess import SincResampler
from ualm_nemo.testing.enhancer_clips import wideband_stereo


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return EnhancementVAE(tiny_config()).eval()


def test_chunked_equals_unchunked_without_seams(vae):
    x = torch.randn(2, 1, 16000 * 5) * 0.3
    whole = vae.enhance(x)
    for chunk, overlap in ((2.0, 1.0), (3.0, 1.5), (1.3, 0.6)):
        out = Enhancer(vae, chunk_seconds=chunk, overlap_seconds=overlap, batch_size=3).enhance(x)
        assert out.shape == whole.shape
        assert (out - whole).abs().max().item() < 2e-3 * whole.abs().max().item()
    # the same cut without overlap shows seams: the test would see them
    seamed = Enhancer(vae, chunk_seconds=1.0, overlap_seconds=0.0).enhance(x)
    assert (seamed - whole).abs().max().item() > 50 * (out - whole).abs().max().item()


def test_short_audio_is_one_piece_and_call_is_the_post_processor_contract(vae):
    x = torch.randn(16000) * 0.3
    enhancer = Enhancer(vae, chunk_seconds=2.0)
    out = enhancer(x)
    assert out.shape == (2, 48000) and enhancer.sample_rate == 48000
    assert torch.equal(out, vae.enhance(x.reshape(1, 1, -1))[0])
    with pytest.raises(ValueError, match="NaN"):
        enhancer(torch.full((3200,), float("nan")))
    with pytest.raises(ValueError, match="overlap_seconds"):
        Enhancer(vae, chunk_seconds=1.0, overlap_seconds=1.0)


def test_export_round_trip_and_damaged_files_are_named(vae, tmp_path):
    folder = save_enhancer(vae, tmp_path / "enhancer")
    loaded = load_enhancer(folder)
    x = torch.randn(1, 1, 3200)
    assert torch.equal(loaded.enhance(x), vae.enhance(x))
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:100])
    with pytest.raises(ValueError, match="model.safetensors"):
        load_enhancer(folder)
    with pytest.raises(FileNotFoundError, match="no such"):
        load_enhancer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither an exported enhancer"):
        load_enhancer(tmp_path / "empty")


def test_lsd_known_answers():
    ref = to_target(torch.from_numpy(wideband_stereo(1.0).T), 48000)
    assert lsd(ref, ref) == pytest.approx(0.0, abs=1e-12)
    # a uniform gain g shifts every log power by 2 log10 g: LSD = |2 log10 g| (1e-8 floor aside)
    assert lsd(ref, ref * 0.5) == pytest.approx(abs(2 * torch.log10(torch.tensor(0.5)).item()), rel=1e-3)
    baseline = SincResampler(48000, 2)(to_input(ref)[0])
    assert baseline.shape == ref.shape
    # the baseline carries nothing above 8 kHz: its high band is worse than its full band, and far from 0
    assert lsd(ref, baseline, min_hz=8000) > lsd(ref, baseline) > 3.0
    assert mrstft_distance(ref, ref) == pytest.approx(0.0, abs=1e-6)
    consistency = low_band_consistency(to_input(ref), ref)
    assert consistency["low_band_lsd"] == pytest.approx(0.0, abs=1e-9) and consistency["low_band_snr_db"] > 100


def test_postprocessor_loader_and_launch_check_say_what_is_wrong(tiny_enhancer, tmp_path):
    """inference.postprocess: the one loader of --enhancer / eval.enhancer, and its weight-free launch check."""
    import json
    import shutil

    from ualm_nemo.inference.postprocess import check_postprocessor, load_postprocessor

    check_postprocessor(tiny_enhancer)
    post = load_postprocessor(tiny_enhancer)
    assert (post.sample_rate, post.channels) == (48000, 2) and post(torch.zeros(3200)).shape == (2, 9600)
    other = shutil.copytree(tiny_enhancer, tmp_path / "other")
    meta = json.loads((other / "config.json").read_text())
    meta["model"]["channels"] *= 2
    (other / "config.json").write_text(json.dumps(meta))
    check_postprocessor(other)  # files and format only: the launch check reads no weights
    with pytest.raises(ValueError, match="weights do not fit its config \\(size mismatch"):
        load_postprocessor(other)
    (other / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="without model.safetensors"):
        check_postprocessor(other)
    (other / "config.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not an enhancer config"):
        check_postprocessor(other)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither an exported enhancer"):
        check_postprocessor(tmp_path / "empty")
