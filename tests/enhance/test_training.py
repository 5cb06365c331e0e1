"""Enhancer training: it learns (beats the resampling baseline above 8 kHz), resumes bit-exactly, two DDP ranks
make the update one rank makes on the whole batch, bad clips are counted, damaged checkpoints are named."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ualm_nemo.enhance.config import EnhancerRun, tiny_config
from ualm_nemo.enhance.data import read_clips
from ualm_nemo.enhance.evaluation import evaluate
from ualm_nemo.enhance.export import load_enhancer
from ualm_nemo.enhance.inference import Enhancer
from ualm_nemo.enhance.model import EnhancementVAE
from ualm_nemo.enhance.training import train_enhancer
from ualm_nemo.testing.enhancer_clips import write_clips

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convolutions: one thread is several times faster than two on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    write_clips(folder, 2, 0.5)
    return folder


def tiny_run(output_dir, data, **train) -> EnhancerRun:
    loss = train.pop("loss", {})
    return EnhancerRun.from_dict({
        "output_dir": str(output_dir), "model": {"preset": "tiny"},
        "loss": {"discriminator_filters": 4, "discriminator_ffts": [512, 128], **loss},
        "train": {"data": str(data), "segment_seconds": 0.08, "global_batch_size": 2, "max_steps": 4, "lr": 3e-3,
                  "num_workers": 0, "log_every_n_steps": 1, "checkpoint_every_n_steps": 2,
                  "log_audio_every_n_steps": 1000, **train}})


def checkpoint_tensors(output_dir: Path, step: int) -> dict[str, torch.Tensor]:
    state = torch.load(output_dir / "checkpoints" / f"iter_{step:07d}.ckpt", weights_only=True)
    flat = {}

    def walk(prefix, value):
        if isinstance(value, torch.Tensor):
            flat[prefix] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}.{i}", v)
    walk("", {k: v for k, v in state.items() if k != "config"})
    return flat


def assert_same_state(a: dict, b: dict, exact: bool = True) -> None:
    assert a.keys() == b.keys() and len(a) > 50
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)


def test_short_training_learns_and_beats_the_resampling_baseline(tmp_path):
    data = tmp_path / "one"
    write_clips(data, 1, 0.5)
    run = tiny_run(tmp_path / "run", data, segment_seconds=0.16, global_batch_size=1, max_steps=200,
                   ema_decay=0.9, log_every_n_steps=10, log_audio_every_n_steps=200,
                   loss={"adversarial_start_step": 150})
    result = train_enhancer(run, progress=False)
    assert result.step == 200 and result.state == "finished"
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("train/total")] == list(range(10, 201, 10))  # one value per step
    stft = [e.value for e in events.Scalars("train/stft")]  # the total gains the GAN terms at step 150
    assert stft[-1] < 0.7 * stft[0]
    assert "train/discriminator" in events.Tags()["scalars"]
    assert {"spectrogram/output", "spectrogram/target"} <= set(events.Tags()["images"])
    assert "audio/output_mid" in events.Tags()["audio"]

    torch.manual_seed(1234)
    untrained = evaluate(Enhancer(EnhancementVAE(tiny_config())), read_clips(data), progress=False)
    trained = evaluate(Enhancer(load_enhancer(tmp_path / "run")), read_clips(data), progress=False)
    e, b = trained["enhancer"], trained["baseline"]
    assert trained["clips"] == 1 and trained["skipped"] == 0
    assert e["lsd_high"] < 0.5 * untrained["enhancer"]["lsd_high"] and e["lsd_high"] < 0.3 * b["lsd_high"]
    assert e["mrstft"] < b["mrstft"]


def test_resume_is_bit_exact(tmp_path, clips):
    straight = train_enhancer(tiny_run(tmp_path / "a", clips, loss={"adversarial_start_step": 1}), progress=False)
    first = train_enhancer(tiny_run(tmp_path / "b", clips, max_steps=2, loss={"adversarial_start_step": 1}),
                           progress=False)
    assert first.step == 2
    resumed = train_enhancer(tiny_run(tmp_path / "b", clips, loss={"adversarial_start_step": 1}), progress=False)
    assert straight.step == resumed.step == 4
    assert_same_state(checkpoint_tensors(tmp_path / "a", 4), checkpoint_tensors(tmp_path / "b", 4))
    # TensorBoard holds one value per step across the resume
    steps = [e.step for e in EventAccumulator(str(tmp_path / "b" / "tensorboard")).Reload().Scalars("train/total")]
    assert steps == [1, 2, 3, 4]


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, clips, caplog):
    train_enhancer(tiny_run(tmp_path / "r", clips), progress=False)
    latest = tmp_path / "r" / "checkpoints" / "iter_0000004.ckpt"
    latest.write_bytes(latest.read_bytes()[:1000])  # a save cut short
    with caplog.at_level(logging.WARNING):
        result = train_enhancer(tiny_run(tmp_path / "r", clips, max_steps=5), progress=False)
    assert result.step == 5  # resumed from step 2, trained 3 steps
    assert "iter_0000004.ckpt cannot be read" in caplog.text and "resumed from iter_0000002.ckpt" in caplog.text


def test_bad_clips_are_rejected_or_skipped_and_counted(tmp_path, caplog):
    data = tmp_path / "mixed"
    write_clips(data, 1, 0.5)
    sf.write(data / "silent.wav", np.zeros((24000, 2), np.float32), 48000)
    sf.write(data / "three_channels.wav", np.random.default_rng(0).uniform(-0.5, 0.5, (24000, 3)), 48000)
    (data / "broken.wav").write_bytes(b"RIFF1234WAVEjunk")
    clips = read_clips(data)
    reasons = dict(clips.rejected)
    assert [c.id for c in clips.cuts] == ["clip0.wav", "silent.wav"]
    assert "3 channels" in reasons["three_channels.wav"] and "unreadable audio" in reasons[str(data / "broken.wav")]
    with caplog.at_level(logging.WARNING):
        result = train_enhancer(tiny_run(tmp_path / "run", data, max_steps=3), progress=False)
    assert result.step == 3 and result.skipped.get("silent", 0) >= 1  # redrawn, counted, named
    assert "skipped a crop of silent.wav (silent)" in caplog.text
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_clips(tmp_path / "nowhere")


def test_two_ddp_ranks_make_the_update_of_one_rank_on_the_whole_batch(tmp_path, clips):
    """Real DDP: torchrun starts two gloo ranks of the real command. Spectral convergence is off here: it is a ratio
    of norms over the batch, not a mean over samples, so it is the one term whose split differs by design."""
    overrides = [f"train.data={clips}", "model.preset=tiny", "loss.discriminator_filters=4",
                 "loss.discriminator_ffts=[512,128]", "loss.spectral_convergence=0", "loss.adversarial_start_step=1",
                 "train.segment_seconds=0.08", "train.global_batch_size=4", "train.max_steps=2", "train.lr=3e-3",
                 "train.num_workers=0", "train.checkpoint_every_n_steps=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "examples" / "train_enhancer.py"), f"output_dir={tmp_path / 'ddp'}", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = tiny_run(tmp_path / "one", clips, global_batch_size=4, max_steps=2,
                      loss={"spectral_convergence": 0, "adversarial_start_step": 1})
    train_enhancer(single, progress=False)
    ddp, one = checkpoint_tensors(tmp_path / "ddp", 2), checkpoint_tensors(tmp_path / "one", 2)
    assert ddp.keys() == one.keys()
    weights = [k for k in ddp if k.startswith((".vae", ".discriminator", ".ema")) and ddp[k].is_floating_point()]
    diffs = torch.cat([(ddp[k] - one[k]).abs().flatten() for k in weights])
    # Adam's first steps move each weight by about lr whatever the gradient's size, so a near-zero gradient whose
    # sign differs in the last bits (another summation order) moves a few weights apart by up to ~lr; a rank
    # training on its half batch alone would move almost all of them apart by that much
    assert diffs.max().item() < 0.3 * 3e-3
    assert (diffs > 1e-5).float().mean().item() < 0.05


def test_data_loader_workers_give_the_same_batches_in_order(tmp_path, clips):
    """Worker w makes steps start + w, start + w + W, ...; the loader's round-robin yields them in step order."""
    train_enhancer(tiny_run(tmp_path / "w0", clips, max_steps=5, checkpoint_every_n_steps=5), progress=False)
    train_enhancer(tiny_run(tmp_path / "w2", clips, max_steps=5, checkpoint_every_n_steps=5, num_workers=2),
                   progress=False)
    assert_same_state(checkpoint_tensors(tmp_path / "w0", 5), checkpoint_tensors(tmp_path / "w2", 5))
