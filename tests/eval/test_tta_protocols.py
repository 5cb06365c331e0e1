"""Each TTA metric model's preprocessing against its reference protocol (rates, windows, padding, channels,
chunk weights), with random weights at the real sizes loaded from files in the public checkpoint layouts."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile
import torch

from ualm_nemo.eval import audio_prep
from ualm_nemo.eval.checkpoints import MetricModelError, load_weights, require_file
from ualm_nemo.eval.divergences import inception_score


def test_inception_score_splits_follow_the_seeded_shuffle():
    order = np.random.RandomState(2020).permutation(20)  # the clips' order after the shuffle: 10 splits of 2
    classes = np.empty(20, dtype=int)
    for split, (a, b) in enumerate(order.reshape(10, 2)):
        classes[a], classes[b] = split, split if split < 4 else split + 10  # 4 splits of one class, 6 of two
    mean, std = inception_score(np.eye(20)[classes], splits=10)
    # IS of two one-hot clips: 1 for one class, 2 for two; population std over the splits
    assert mean == pytest.approx(1.6) and std == pytest.approx(np.sqrt(0.24))
    unshuffled = [1.0 if classes[2 * k] == classes[2 * k + 1] else 2.0 for k in range(10)]
    assert np.mean(unshuffled) != pytest.approx(1.6)  # the answer depends on the seeded shuffle


def test_audio_prep_steps():
    wav = np.array([[0.1, -0.5, 0.25]], dtype=np.float32)
    peak = audio_prep.peak_normalise(wav)
    assert np.abs(peak).max() == pytest.approx(10 ** (-1 / 20)) and peak[0, 0] / peak[0, 1] == pytest.approx(-0.2)
    assert np.array_equal(audio_prep.peak_normalise(np.zeros((1, 4), np.float32)), np.zeros((1, 4)))
    assert audio_prep.stereo(wav).shape == (2, 3) and np.array_equal(audio_prep.stereo(wav)[1], wav[0])
    two = np.stack([wav[0], -wav[0]])
    assert np.allclose(audio_prep.mono(two), 0) and np.array_equal(audio_prep.first_channel(two), wav)
    assert np.allclose(audio_prep.int16_round_trip(np.array([[2.0, 0.5]])), [[1.0, 16383 / 32767]], atol=1e-7)
    for method in ("soxr_hq", "torchaudio"):
        assert audio_prep.resample(np.zeros((2, 16000), np.float32), 16000, 44100, method).shape == (2, 44100)
    assert audio_prep.pad_to(wav, 5).shape == (1, 5) and audio_prep.pad_to(wav, 2).shape == (1, 3)


def test_unreadable_audio_and_missing_checkpoints_are_named(tmp_path):
    (tmp_path / "junk.wav").write_bytes(b"not audio")
    with pytest.raises(audio_prep.AudioError, match="junk.wav"):
        audio_prep.read_audio(tmp_path / "junk.wav")
    with pytest.raises(MetricModelError, match="--panns .*nothing.pth: no such checkpoint"):
        require_file(tmp_path / "nothing.pth", "--panns")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(MetricModelError, match="not a state dict"):
        load_weights(tmp_path / "list.pt", "--openl3")


def test_openl3_windows_channels_and_rate(metric_models):
    from ualm_nemo.eval.openl3_fd import OpenL3Embedder

    # centred 1 s windows every 0.5 s at 48 kHz: 1 + ceil((len + 0.5 s - 1 s) / 0.5 s), at least one
    for seconds, count in ((0.3, 1), (1.0, 2), (2.0, 4), (2.2, 5)):
        assert OpenL3Embedder.windows(np.zeros(int(seconds * 44100))).shape == (count, 1, 48000)
    embedder = OpenL3Embedder.load(metric_models["openl3"])
    mono16k = (0.1 * np.random.default_rng(0).standard_normal((1, 16000))).astype(np.float32)
    prepared = embedder.prepare(mono16k, 16000)
    assert prepared.shape == (2, 44100) and np.array_equal(prepared[0], prepared[1])  # mono copied to L and R
    assert np.abs(prepared).max() == pytest.approx(10 ** (-1 / 20), rel=0.02)
    frames = embedder.embed(mono16k, 16000)
    assert frames.shape == (2, 1024) and np.allclose(frames[:, :512], frames[:, 512:])  # L and R concatenated
    stereo = np.stack([mono16k[0], np.roll(mono16k[0], 4000)])
    assert not np.allclose(*np.split(embedder.embed(stereo, 16000), 2, axis=1))
    embedder.channels = 1
    assert embedder.embed(stereo, 16000).shape == (2, 512)


def test_passt_windows_and_class_distribution(metric_models):
    from ualm_nemo.eval.passt_kl import RATE, PasstClassifier, distribution, window_starts, windows

    # SAM: starts every 5 s below max(5 s, length - 5 s); a short window is zero-padded to 10 s if over 1.5 s
    assert window_starts(7 * RATE) == [0] and window_starts(12 * RATE) == [0, 5 * RATE]
    assert window_starts(16 * RATE) == [0, 5 * RATE, 10 * RATE]
    assert [w.shape[0] for w in windows(np.ones(16 * RATE))] == [10 * RATE] * 3
    assert [w.shape[0] for w in windows(np.ones(RATE))] == [RATE]  # under 1.5 s: fed as it is
    tail = windows(np.ones(12 * RATE))[1]
    assert tail[: 7 * RATE].all() and not tail[7 * RATE:].any()
    prepared = PasstClassifier.prepare(np.ones((2, 48000), np.float32) * 0.2, 48000)
    assert prepared.shape == (RATE,) and np.abs(prepared).max() == pytest.approx(10 ** (-1 / 20), rel=1e-3)
    classifier = PasstClassifier.load(metric_models["passt"])
    clip = (0.1 * np.random.default_rng(1).standard_normal((1, 12 * 16000))).astype(np.float32)
    logits = classifier.logits(clip, 16000)
    assert logits.shape == (2, 527)  # one row per window
    expected = np.exp(logits.mean(0)) / np.exp(logits.mean(0)).sum()  # mean over windows, then softmax
    assert np.allclose(distribution(logits), expected)
    assert not np.allclose(distribution(logits), np.mean([distribution(row[None]) for row in logits], axis=0))
    assert classifier.probabilities(clip[:, :16000], 16000).sum() == pytest.approx(1.0)


def test_cnn14_loads_the_public_key_names_strictly(tmp_path, metric_models):
    from ualm_nemo.eval.panns import MIN_SAMPLES, Cnn14, PannsClassifier

    state = Cnn14().state_dict()
    for key in ("spectrogram_extractor.stft.conv_real.weight", "spectrogram_extractor.stft.conv_imag.weight",
                "logmel_extractor.melW", "bn0.running_mean", "conv_block1.conv1.weight", "conv_block6.bn2.weight",
                "fc1.weight", "fc_audioset.bias"):
        assert key in state
    assert state["fc_audioset.weight"].shape == (527, 2048) and state["logmel_extractor.melW"].shape == (257, 64)
    torch.save({"model": state, "iteration": 1}, tmp_path / "cnn14.pth")
    loaded = PannsClassifier.load(tmp_path / "cnn14.pth")
    assert all(torch.equal(v, loaded.model.state_dict()[k]) for k, v in state.items())
    del state["fc1.bias"]
    torch.save({"model": state}, tmp_path / "broken.pth")
    with pytest.raises(MetricModelError, match="fc1.bias"):
        PannsClassifier.load(tmp_path / "broken.pth")
    # audioldm_eval: first channel, DC removed, 16 kHz, at least 2 s
    clip = np.stack([np.full(48000, 0.5, np.float32), np.zeros(48000, np.float32)])
    prepared = PannsClassifier.prepare(clip, 48000)
    assert prepared.shape == (MIN_SAMPLES,) and np.abs(prepared).max() < 1e-4  # a constant: DC gone
    assert PannsClassifier.prepare(np.zeros((1, 48000 * 3), np.float32), 48000).shape == (48000,)
    probs, embedding = loaded.outputs(np.random.default_rng(0).standard_normal((1, 16000)).astype(np.float32), 16000)
    assert probs.shape == (527,) and probs.sum() == pytest.approx(1.0) and embedding.shape == (2048,)


def test_clap_input_protocol(metric_models):
    from ualm_nemo.eval.clap_score import CLIP_SAMPLES, RATE, ClapScorer, cosine, roberta_shape

    scorer = ClapScorer.load(metric_models["clap"], metric_models["clap_tokenizer"])
    state = torch.load(metric_models["clap"], weights_only=True)["state_dict"]
    assert roberta_shape({k[7:]: v for k, v in state.items()})["num_hidden_layers"] == 1
    prepared = ClapScorer.prepare(np.full((2, 16000), 0.3, np.float32), 16000)
    assert prepared.shape == (RATE,) and np.allclose(prepared * 32767, np.round(prepared * 32767))  # int16 grid
    rng = np.random.default_rng(0)
    short = scorer.features(rng.standard_normal((1, RATE * 3)).astype(np.float32) * 0.1, RATE)
    assert short["waveform"].shape == (CLIP_SAMPLES,) and not short["longer"].item()
    wave = short["waveform"].numpy()
    assert np.allclose(wave[: RATE * 3], wave[RATE * 3: RATE * 6])  # repeat-padded
    long = rng.standard_normal((1, RATE * 14)).astype(np.float32) * 0.1
    first, again = scorer.features(long, RATE), scorer.features(long, RATE)
    assert first["longer"].item() and first["mel_fusion"].shape[0] == 4  # shrunk whole + 3 crops
    assert torch.equal(first["mel_fusion"], again["mel_fusion"])  # seeded crops: reproducible
    scorer.seed = 1
    assert not torch.equal(first["mel_fusion"], scorer.features(long, RATE)["mel_fusion"])
    audio, text = scorer.audio_embedding(long, RATE), scorer.text_embeddings(["a dog barks"])[0]
    assert audio.shape == text.shape == (512,) and -1 <= cosine(audio, text) <= 1
    with pytest.raises(MetricModelError, match="--clap-tokenizer"):
        ClapScorer.load(metric_models["clap"], metric_models["clap"].parent / "nowhere")


def test_aesthetics_chunks_and_missing_checkpoint(tmp_path, metric_models):
    from ualm_nemo.eval.aesthetics import AXES, AesScorer, chunk_weights

    assert chunk_weights(16000 * 25) == [1.0, 1.0, 0.5] and chunk_weights(16000 * 10) == [1.0]
    assert chunk_weights(8000) == [0.05]
    with pytest.raises(MetricModelError, match="no such checkpoint"):  # never the library's hub fallback
        AesScorer.load(tmp_path / "checkpoint.pt")
    scorer = AesScorer.load(metric_models["aes"])
    clip = (0.1 * np.random.default_rng(0).standard_normal((2, 16000 * 12))).astype(np.float32)
    scores = scorer.scores(clip, 16000)
    assert set(scores) == set(AXES)
    # length weighting: a 12 s clip = (10 s chunk + 0.2 * its 2 s tail chunk) / 1.2, each scored alone
    mono = clip.mean(0, keepdims=True)
    head, tail = scorer.scores(mono[:, :160000], 16000), scorer.scores(mono[:, 160000:], 16000)
    for axis in AXES:
        assert scores[axis] == pytest.approx((head[axis] + 0.2 * tail[axis]) / 1.2, rel=1e-4)


@pytest.mark.parametrize("rate, samples", [(44100, 220500), (22050, 110250), (22050, 12345)])
def test_clap_and_passt_take_librosa_load_lengths(tmp_path, rate, samples):
    """SAM loads with ``librosa.load(sr=...)``: ceil(n * (48000 / rate)) in float arithmetic, one sample more than
    soxr gives at these lengths (5 s at 44.1 kHz: 240001), which moves laion_clap's repeat padding."""
    from ualm_nemo.eval.clap_score import ClapScorer
    from ualm_nemo.eval.passt_kl import PasstClassifier

    wav = (np.random.default_rng(0).standard_normal((2, samples)) * 0.1).astype(np.float32)
    assert audio_prep.resample(wav, rate, 48000, "soxr_hq").shape[-1] == round(samples * 48000 / rate)
    assert ClapScorer.prepare(wav, rate).shape == (int(np.ceil(samples * (48000 / rate))),)
    assert ClapScorer.prepare(wav, rate).shape[0] == round(samples * 48000 / rate) + 1
    assert PasstClassifier.prepare(wav, rate).shape == (int(np.ceil(samples * (32000 / rate))),)
    librosa = pytest.importorskip("librosa")
    path = tmp_path / "clip.wav"
    soundfile.write(path, wav.T, rate, subtype="FLOAT")
    expected = librosa.load(path, sr=48000, mono=True)[0]
    resampled = audio_prep.resample(audio_prep.mono(audio_prep.read_audio(path)[0]), rate, 48000, "librosa")[0]
    assert resampled.shape == expected.shape and np.allclose(resampled, expected, atol=1e-6)
