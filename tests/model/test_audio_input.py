"""Audio input path: placeholder splice (hand-built tensors), frame counts, freezing, adapter, local-folder loading."""

from __future__ import annotations


import pytest
import torch
from safetensors.torch import save_file

from ualm_nemo.model.audio_frames import SAMPLE_RATE, num_encoder_frames_from_mel, num_mel_frames
from ualm_nemo.model.audio_input import (AudioAdapter, AudioInput, build_audio_encoder, load_audio_tower,
                                         splice_audio_embeddings)
from ualm_nemo.model.config import AudioInputConfig, ConfigError
from ualm_nemo.testing.encoder_folders import tiny_af_whisper, write_fake_af3_folder, write_fake_omni_folder

HIDDEN = 48


def _cfg(**kw) -> AudioInputConfig:
    """The tiny random tower, or the folder given as encoder_path."""
    return AudioInputConfig(**{"encoder_dim": 32, "encoder_layers": 2, "encoder_heads": 2,
                               "random_encoder": "encoder_path" not in kw, **kw})


def _batch(seconds: list[float], n_mel: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded log-mel batch [N, n_mel, F_max] and lengths [N] for clips of the given durations."""
    lens = torch.tensor([num_mel_frames(round(s * SAMPLE_RATE)) for s in seconds])
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(len(seconds), n_mel, int(lens.max()), generator=g)
    feats = feats * (torch.arange(feats.shape[-1]) < lens[:, None, None])  # zero padding, like a collator would
    return feats, lens


@pytest.fixture(scope="module")
def tiny_encoder():
    torch.manual_seed(0)
    return build_audio_encoder(_cfg())


# ---------------------------------------------------------------- splice


def test_splice_places_rows_batch_major_then_sequence():
    s, b, h = 5, 2, 3
    emb = torch.zeros(s, b, h)
    mask = torch.tensor([[0, 1, 1, 0, 1],   # row 0: three placeholders
                         [1, 0, 0, 0, 0]],  # row 1: one placeholder
                        dtype=torch.bool)
    audio = torch.arange(1, 5, dtype=torch.float)[:, None].expand(4, h)  # row k filled with k+1
    out = splice_audio_embeddings(emb, mask, audio)
    assert out.shape == (s, b, h)
    expected = torch.zeros(s, b)
    expected[1, 0], expected[2, 0], expected[4, 0], expected[0, 1] = 1, 2, 3, 4
    torch.testing.assert_close(out, expected[..., None].expand(s, b, h))
    assert torch.equal(emb, torch.zeros(s, b, h))  # input untouched (out-of-place)


def test_splice_keeps_non_placeholder_positions_and_dtype():
    emb = torch.randn(4, 3, 2, dtype=torch.bfloat16)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[2, 3] = True
    out = splice_audio_embeddings(emb, mask, torch.full((1, 2), 7.0))
    assert out.dtype == torch.bfloat16
    assert torch.equal(out[3, 2], torch.full((2,), 7.0, dtype=torch.bfloat16))
    keep = ~mask.T[..., None].expand_as(emb)  # [s, b, h]
    assert torch.equal(out[keep], emb[keep])


def test_splice_count_mismatch_names_both_counts():
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[0, :3] = True
    with pytest.raises(ValueError, match=r"3 audio placeholder positions but 2 audio embeddings"):
        splice_audio_embeddings(torch.zeros(4, 2, 8), mask, torch.zeros(2, 8))


def test_splice_rejects_mask_of_wrong_layout():
    with pytest.raises(ValueError, match=r"placeholder_mask must be \[b=2, s=4\]"):
        splice_audio_embeddings(torch.zeros(4, 2, 8), torch.zeros(4, 2, dtype=torch.bool), torch.zeros(0, 8))


def test_splice_gradient_flows_to_both_inputs():
    emb = torch.randn(3, 2, 4, requires_grad=True)
    audio = torch.randn(2, 4, requires_grad=True)
    mask = torch.tensor([[0, 1, 0], [0, 0, 1]], dtype=torch.bool)
    weights = torch.randn(3, 2, 4)
    (splice_audio_embeddings(emb, mask, audio) * weights).sum().backward()
    torch.testing.assert_close(audio.grad, torch.stack([weights[1, 0], weights[2, 1]]))
    grad_mask = (~mask.T)[..., None].float()  # [s, b, 1]: zero gradient where audio overwrote the token
    torch.testing.assert_close(emb.grad, weights * grad_mask)


# ---------------------------------------------------------------- encoder + adapter


def test_output_length_matches_frame_formula(tiny_encoder):
    seconds = [1.0, 1.37, 2.5, 0.01]
    feats, lens = _batch(seconds)
    model = AudioInput(_cfg(), HIDDEN, encoder=tiny_encoder)
    out = model(feats, lens)
    per_clip = [num_encoder_frames_from_mel(int(n)) for n in lens]
    assert per_clip[:3] == [25, 34, 62]  # 100 / 137 / 250 mel frames at 25 Hz
    assert out.shape == (sum(per_clip), HIDDEN)


def test_clips_are_independent_and_concatenated_in_order(tiny_encoder):
    feats, lens = _batch([1.37, 2.5])
    model = AudioInput(_cfg(), HIDDEN, encoder=tiny_encoder)
    both = model(feats, lens)
    first = model(feats[:1, :, : lens[0]], lens[:1])
    second = model(feats[1:], lens[1:])
    torch.testing.assert_close(both, torch.cat([first, second]), rtol=1e-5, atol=1e-5)


def test_encoder_frozen_and_stays_in_eval_mode():
    torch.manual_seed(0)
    model = AudioInput(_cfg(), HIDDEN).train()
    assert model.training and model.adapter.training
    assert not model.encoder.tower.training
    assert not any(m.training for m in model.encoder.tower.modules())
    assert all(not p.requires_grad for p in model.encoder.parameters())
    assert all(p.requires_grad for p in model.adapter.parameters())
    feats, lens = _batch([1.0])
    model(feats, lens).sum().backward()
    assert model.adapter.fc1.weight.grad is not None
    assert all(p.grad is None for p in model.encoder.parameters())


def test_tiny_encoder_is_deterministic_under_seed():
    torch.manual_seed(3)
    a = build_audio_encoder(_cfg())
    torch.manual_seed(3)
    b = build_audio_encoder(_cfg())
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_adapter_linear_vs_mlp_parameter_counts():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(AudioAdapter(32, HIDDEN, "linear")) == 32 * HIDDEN + HIDDEN
    assert count(AudioAdapter(32, HIDDEN, "mlp")) == 32 * HIDDEN + HIDDEN + HIDDEN * HIDDEN + HIDDEN
    with pytest.raises(ConfigError, match="model.audio_in.adapter"):
        AudioAdapter(32, HIDDEN, "conv")


def test_adapter_follows_its_dtype(tiny_encoder):
    model = AudioInput(_cfg(adapter="mlp"), HIDDEN, encoder=tiny_encoder)
    model.adapter.to(torch.bfloat16)
    feats, lens = _batch([1.0])
    assert model(feats, lens).dtype == torch.bfloat16


# ---------------------------------------------------------------- loading from local folders


def test_roundtrip_encoder_only_folder(tmp_path, tiny_encoder):
    tiny_encoder.tower.save_pretrained(tmp_path)
    loaded = build_audio_encoder(_cfg(encoder_path=str(tmp_path)))
    feats, lens = _batch([1.0, 1.37])
    assert torch.equal(loaded(feats, lens), tiny_encoder(feats, lens))
    assert all(not p.requires_grad for p in loaded.parameters())


@pytest.mark.parametrize("nested,sharded", [(True, False), (True, True), (False, False)],
                         ids=["omni", "omni-sharded", "thinker-only"])
def test_loads_only_audio_tower_from_omni_folder(tmp_path, tiny_encoder, nested, sharded):
    write_fake_omni_folder(tmp_path, tiny_encoder.tower, nested=nested, sharded=sharded)
    loaded = build_audio_encoder(_cfg(encoder_path=str(tmp_path)))
    assert loaded.tower.state_dict().keys() == tiny_encoder.tower.state_dict().keys()
    feats, lens = _batch([1.0, 2.5], seed=1)
    assert torch.equal(loaded(feats, lens), tiny_encoder(feats, lens))


def test_audio_input_reads_encoder_dim_from_folder(tmp_path, tiny_encoder):
    tiny_encoder.tower.save_pretrained(tmp_path)
    model = AudioInput(_cfg(encoder_path=str(tmp_path), encoder_dim=999), HIDDEN)
    assert model.adapter.fc1.in_features == tiny_encoder.output_dim


def test_missing_folder_names_the_path(tmp_path):
    missing = tmp_path / "no_such_encoder"
    with pytest.raises(FileNotFoundError, match="no_such_encoder"):
        build_audio_encoder(_cfg(encoder_path=str(missing)))


def test_folder_without_weights_names_the_path(tmp_path, tiny_encoder):
    tiny_encoder.tower.config.to_json_file(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_audio_tower(tmp_path)


def test_folder_missing_tower_tensors_is_an_error(tmp_path, tiny_encoder):
    tiny_encoder.tower.config.to_json_file(tmp_path / "config.json")
    state = {k: v.contiguous() for k, v in tiny_encoder.tower.state_dict().items() if not k.startswith("proj.")}
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match="proj.weight"):
        load_audio_tower(tmp_path)


def test_mel_bin_mismatch_names_the_config_key(tmp_path, tiny_encoder):
    tiny_encoder.tower.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="model.audio_in.num_mel_bins"):
        build_audio_encoder(_cfg(encoder_path=str(tmp_path), num_mel_bins=80))


# ---------------------------------------------------------------- AF-Whisper (Audio Flamingo 3's encoder)


def _af3_reference(tower, feats, lens):
    """transformers' own path: AudioFlamingo3Model.get_audio_features on 1 s windows (the last one padded with
    the clip's floor value and masked), its projector applied; returns (projected frames, windows made)."""
    from transformers import AudioFlamingo3Config, AudioFlamingo3Model, Qwen2Config

    text = Qwen2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, vocab_size=64)
    model = AudioFlamingo3Model(AudioFlamingo3Config(audio_config=tower.config, text_config=text)).eval()
    model.audio_tower.load_state_dict(tower.state_dict())
    window = 2 * tower.config.max_source_positions
    windows, masks = [], []
    for clip, n in zip(feats, lens.tolist()):
        for start in range(0, n, window):
            part = clip[:, start:min(start + window, n)]
            padded = torch.full((clip.shape[0], window), float(clip[:, :n].min()))
            padded[:, : part.shape[1]] = part
            windows.append(padded)
            masks.append(torch.arange(window) < part.shape[1])
    with torch.no_grad():
        out = model.get_audio_features(torch.stack(windows), torch.stack(masks).long()).pooler_output
    return out, model.multi_modal_projector, len(windows)


def test_af_whisper_windows_match_audio_flamingo_reference():
    """Clips of 1 s, 2.5 s (three windows, the last half full), 0.37 s: the frames kept, their order and count
    are those of transformers' AudioFlamingo3Model, and the count is audio_frames' formula."""
    from ualm_nemo.model.audio_input import FrozenAudioEncoder

    torch.manual_seed(3)
    tower = tiny_af_whisper(window_seconds=1.0)
    encoder = FrozenAudioEncoder(tower)
    assert encoder.window == 100 and encoder.output_dim == 32
    feats, lens = _batch([1.0, 2.5, 0.37], seed=4)
    ours = encoder(feats, lens)
    assert ours.shape == (sum(num_encoder_frames_from_mel(int(n)) for n in lens), 32)
    reference, projector, n_windows = _af3_reference(tower, feats, lens)
    assert n_windows == 5
    with torch.no_grad():
        torch.testing.assert_close(projector(ours), reference, rtol=1e-5, atol=1e-5)


def test_af_whisper_clip_is_independent_of_its_batch():
    from ualm_nemo.model.audio_input import FrozenAudioEncoder

    torch.manual_seed(3)
    encoder = FrozenAudioEncoder(tiny_af_whisper())
    feats, lens = _batch([2.5, 1.37], seed=5)
    both = encoder(feats, lens)
    alone = encoder(feats[1:, :, : lens[1]], lens[1:])
    torch.testing.assert_close(both[-alone.shape[0]:], alone, rtol=1e-5, atol=1e-5)


def test_af_whisper_window_must_keep_the_frame_formula():
    from ualm_nemo.model.audio_input import FrozenAudioEncoder

    with pytest.raises(ConfigError, match="not a multiple of 4"):
        FrozenAudioEncoder(tiny_af_whisper(window_seconds=0.5))  # 25 positions: a 50-mel-frame window


@pytest.mark.parametrize("layout", ["audio-flamingo-3", "encoder-only"])
def test_loads_af_whisper_from_folder(tmp_path, layout):
    torch.manual_seed(6)
    tower = tiny_af_whisper()
    if layout == "encoder-only":
        tower.save_pretrained(tmp_path)
    else:
        write_fake_af3_folder(tmp_path, tower)
    encoder = build_audio_encoder(_cfg(encoder_path=str(tmp_path)))
    assert type(encoder.tower).__name__ == "AudioFlamingo3Encoder" and encoder.output_dim == 32
    feats, lens = _batch([1.0, 2.5], seed=7)
    from ualm_nemo.model.audio_input import FrozenAudioEncoder

    torch.testing.assert_close(encoder(feats, lens), FrozenAudioEncoder(tower)(feats, lens), rtol=0, atol=0)
    model = AudioInput(_cfg(encoder_path=str(tmp_path), encoder_dim=999), HIDDEN)
    assert model.adapter.fc1.in_features == 32  # the adapter follows the loaded encoder's width
