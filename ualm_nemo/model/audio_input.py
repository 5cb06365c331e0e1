"""Audio input path (audio understanding): frozen audio encoder + trainable adapter + placeholder splice.

    features [N, n_mel, F_max] (100 Hz log-mel, right-padded), feature_lens [N]
      -> FrozenAudioEncoder (conv stride 2 -> transformer -> avg-pool 2)                     25 Hz, no grad
      -> AudioAdapter (Linear, or Linear-GELU-Linear)                                         trainable
      -> [sum_i num_encoder_frames_from_mel(feature_lens[i]), hidden], clips concatenated in order
      -> splice_audio_embeddings(...) writes those rows over the placeholder positions of [s, b, h].

Two encoders, chosen by the folder's config (``model_type``):

* the Qwen2.5-Omni audio tower (the default; the tiny test encoder is one): variable-length input, attention
  within ``n_window`` chunks;
* AF-Whisper, Audio Flamingo 3's encoder (``AudioFlamingo3Encoder``): Whisper-large-v3 with avg-pool, which only
  takes fixed 30 s windows (``2 * max_source_positions`` mel frames). Each clip is cut into windows, the last one
  padded (with the clip's lowest log-mel value: what Whisper's feature extractor gives zero-padded audio after
  its clamp, up to the one boundary frame) and masked, and the valid frames of each window are kept, as
  ``AudioFlamingo3Model.get_audio_features`` does. The window is a multiple of 4 mel frames, so the frame count
  is the same formula as the Qwen tower's.

Weights come only from a local folder (no hub here): an encoder-only folder (what ``save_pretrained`` of the
tower writes), a full Qwen2.5-Omni folder (only ``thinker.audio_tower.*`` is read), a thinker-only folder or a
full Audio Flamingo 3 folder (``audio_tower.*``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers.models.audioflamingo3.configuration_audioflamingo3 import AudioFlamingo3EncoderConfig
from transformers.models.audioflamingo3.modeling_audioflamingo3 import AudioFlamingo3Encoder
from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniAudioEncoderConfig
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniAudioEncoder

from ualm_nemo.model.audio_frames import num_encoder_frames_from_mel
from ualm_nemo.model.config import AudioInputConfig, ConfigError

TINY_N_WINDOW = 50  # chunks of 100 mel frames (1 s): a 1-3 s test clip spans 1-3 chunks, so chunking is exercised

# (config.json keys leading to the audio config, prefix of the tower's tensors) per folder layout, most nested first
_LAYOUTS = (
    (("thinker_config", "audio_config"), "thinker.audio_tower."),  # full Qwen2.5-Omni (thinker + talker + token2wav)
    (("audio_config",), "audio_tower."),  # thinker-only Qwen2.5-Omni folder, or a full Audio Flamingo 3 folder
    ((), ""),  # encoder-only folder (the tower's save_pretrained)
)
# the audio config's model_type -> (config class, tower class)
_TOWERS = {
    "qwen2_5_omni_audio_encoder": (Qwen2_5OmniAudioEncoderConfig, Qwen2_5OmniAudioEncoder),
    "audioflamingo3_encoder": (AudioFlamingo3EncoderConfig, AudioFlamingo3Encoder),  # AF-Whisper
}
AudioTower = Qwen2_5OmniAudioEncoder | AudioFlamingo3Encoder


class FrozenAudioEncoder(nn.Module):
    """An audio tower (Qwen2.5-Omni or AF-Whisper), frozen: no gradients, and eval mode whatever ``train()`` is
    asked for.

    A wrapper (not a subclass) so that any parent's ``.train()`` cannot switch the tower to train mode and
    so the padded-batch -> tower-input conversion each tower wants lives next to it.
    """

    def __init__(self, tower: AudioTower):
        super().__init__()
        if not isinstance(tower, (Qwen2_5OmniAudioEncoder, AudioFlamingo3Encoder)):
            raise TypeError(f"unsupported audio tower {type(tower).__name__}")
        self.tower = tower
        self.tower.requires_grad_(False)
        self.tower.eval()
        if isinstance(tower, AudioFlamingo3Encoder) and self.window % 4:
            raise ConfigError(f"AF-Whisper window of {self.window} mel frames (2 x max_source_positions) is not a "
                              "multiple of 4: its frame count would not follow audio_frames.num_encoder_frames_from_mel")

    @property
    def window(self) -> int | None:
        """Mel frames per fixed input window (AF-Whisper: 3000 = 30 s), None for variable-length towers."""
        return 2 * self.tower.config.max_source_positions if isinstance(self.tower, AudioFlamingo3Encoder) else None

    @property
    def output_dim(self) -> int:
        if isinstance(self.tower, AudioFlamingo3Encoder):
            return self.tower.config.d_model
        return self.tower.config.output_dim

    @property
    def num_mel_bins(self) -> int:
        return self.tower.config.num_mel_bins

    def train(self, mode: bool = True) -> "FrozenAudioEncoder":
        super().train(mode)
        self.tower.eval()  # dropout etc. stay off: the encoder is a fixed feature extractor
        return self

    @torch.no_grad()
    def forward(self, features: torch.Tensor, feature_lens: torch.Tensor) -> torch.Tensor:
        """features [N, n_mel, F_max], feature_lens [N] (1 <= len <= F_max) -> [sum_i frames_i, output_dim]."""
        n, n_mel, f_max = features.shape
        if n_mel != self.num_mel_bins:
            raise ValueError(f"features have {n_mel} mel bins, the audio encoder expects {self.num_mel_bins} "
                             "(model.audio_in.num_mel_bins)")
        feature_lens = feature_lens.to(device=features.device, dtype=torch.long)
        if feature_lens.shape != (n,) or int(feature_lens.min()) < 1 or int(feature_lens.max()) > f_max:
            raise ValueError(f"feature_lens must be [N={n}] with 1 <= len <= F_max={f_max}, "
                             f"got {feature_lens.tolist()}")
        features = features.to(self.tower.conv1.weight.dtype)  # fp32 log-mel into a bf16 tower in bf16 training
        out = self._windowed(features, feature_lens) if self.window else self._variable(features, feature_lens)
        expected = sum(num_encoder_frames_from_mel(int(f)) for f in feature_lens.tolist())
        if out.shape[0] != expected:  # our placeholder counts (data side) rely on this formula
            raise RuntimeError(f"audio encoder returned {out.shape[0]} frames, audio_frames.num_encoder_frames_from_mel"
                               f" predicts {expected} for mel lengths {feature_lens.tolist()}")
        return out

    def _variable(self, features: torch.Tensor, feature_lens: torch.Tensor) -> torch.Tensor:
        """Qwen2.5-Omni tower: the clips' valid frames concatenated, with their lengths."""
        valid = torch.arange(features.shape[-1], device=features.device) < feature_lens[:, None]  # [N, F_max]
        flat = features.transpose(1, 2)[valid].T  # [n_mel, sum_i feature_lens[i]], clip by clip
        # aftercnn_lens is unused by transformers 5.23 but used by older ports (4.x pooled per clip with it)
        aftercnn_lens, _ = self.tower._get_feat_extract_output_lengths(feature_lens)
        return self.tower(flat, feature_lens=feature_lens, aftercnn_lens=aftercnn_lens).last_hidden_state

    def _windowed(self, features: torch.Tensor, feature_lens: torch.Tensor) -> torch.Tensor:
        """AF-Whisper: every clip cut into fixed windows (the last padded and masked), the valid frames kept."""
        window, n_mel = self.window, features.shape[1]
        inputs, lens = [], []
        for clip, length in zip(features, feature_lens.tolist()):
            clip = clip[:, :length]
            floor = clip.min()  # log-mel of silence after Whisper's clamp: what padding with zeros gives
            for start in range(0, length, window):
                part = clip[:, start:start + window]
                padded = part.new_full((n_mel, window), floor)
                padded[:, : part.shape[1]] = part
                inputs.append(padded)
                lens.append(part.shape[1])
        lens_t = torch.tensor(lens, device=features.device)
        mask = (torch.arange(window, device=features.device) < lens_t[:, None]).long()
        hidden = self.tower(torch.stack(inputs), input_features_mask=mask).last_hidden_state  # [W, window/4, d]
        _, out_lens = self.tower._get_feat_extract_output_lengths(lens_t)
        keep = torch.arange(hidden.shape[1], device=features.device) < out_lens[:, None]
        return hidden[keep]  # windows in order, clips in order


def tiny_encoder_config(cfg: AudioInputConfig) -> Qwen2_5OmniAudioEncoderConfig:
    """A small random tower for tests/demos: d_model = output_dim = cfg.encoder_dim, FFN 2x."""
    return Qwen2_5OmniAudioEncoderConfig(
        num_mel_bins=cfg.num_mel_bins, d_model=cfg.encoder_dim, encoder_layers=cfg.encoder_layers,
        encoder_attention_heads=cfg.encoder_heads, encoder_ffn_dim=2 * cfg.encoder_dim,
        output_dim=cfg.encoder_dim, n_window=TINY_N_WINDOW, max_source_positions=2 * TINY_N_WINDOW)


def build_audio_encoder(cfg: AudioInputConfig) -> FrozenAudioEncoder:
    """Frozen tower from cfg.encoder_path, or the tiny random one ``cfg.random_encoder`` asks for (deterministic
    under torch.manual_seed)."""
    if cfg.random_encoder:
        return FrozenAudioEncoder(Qwen2_5OmniAudioEncoder(tiny_encoder_config(cfg)))
    if not cfg.encoder_path:
        raise ConfigError("model.audio_in.encoder_path is not set (or model.audio_in.random_encoder=true for tests)")
    tower = load_audio_tower(cfg.encoder_path)
    if tower.config.num_mel_bins != cfg.num_mel_bins:
        raise ConfigError(f"model.audio_in.num_mel_bins={cfg.num_mel_bins} but the encoder at {cfg.encoder_path} "
                          f"expects {tower.config.num_mel_bins} mel bins")
    return FrozenAudioEncoder(tower)


def load_audio_tower(path: str | Path) -> AudioTower:
    """Build the tower from a local folder's config.json and stream in only its tensors (safetensors).

    The layout is read from config.json: ``thinker_config.audio_config`` -> full Qwen2.5-Omni, tensors
    ``thinker.audio_tower.*``; ``audio_config`` -> thinker-only Qwen2.5-Omni or full Audio Flamingo 3,
    ``audio_tower.*``; neither -> encoder-only, unprefixed. The audio config's ``model_type`` picks the tower
    (Qwen2.5-Omni or AF-Whisper). Only shards holding tower tensors are opened, and only those tensors are read.
    """
    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"audio encoder folder {folder} has no config.json (model.audio_in.encoder_path)")
    audio_dict, prefix = _find_audio_config(json.loads(config_file.read_text()), config_file)
    config_class, tower_class = _TOWERS[audio_dict["model_type"]]
    with torch.device("meta"):  # no random init of ~640M params that the checkpoint overwrites anyway
        tower = tower_class(config_class.from_dict(audio_dict))
    wanted = {prefix + k: k for k in tower.state_dict()}  # persistent tensors only
    state = _read_safetensors(folder, wanted)
    missing = sorted(set(wanted.values()) - state.keys())
    if missing:
        raise KeyError(f"{folder}: safetensors lack {len(missing)} audio tower tensors, e.g. "
                       f"{[prefix + k for k in missing[:3]]}")
    dtype = torch.get_default_dtype()  # same dtype as the tiny path; callers cast the module if they want bf16
    tower.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    if isinstance(tower, Qwen2_5OmniAudioEncoder):
        pos = tower.positional_embedding  # its one non-persistent buffer: recompute it off the meta device
        pos.register_buffer("positional_embedding", pos.compute_default_singular_positional_embedding().to(dtype),
                            persistent=False)
    if any(t.is_meta for t in (*tower.parameters(), *tower.buffers())):
        raise RuntimeError(f"audio tower from {folder} still has tensors on the meta device")
    return tower


def _find_audio_config(config: dict, config_file: Path) -> tuple[dict, str]:
    for keys, prefix in _LAYOUTS:
        node = config
        for key in keys:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and node.get("model_type") in _TOWERS:
            return node, prefix
        if isinstance(node, dict) and "d_model" in node and "num_mel_bins" in node:  # configs without model_type
            return {**node, "model_type": "qwen2_5_omni_audio_encoder"}, prefix
    raise ValueError(f"{config_file} is neither a Qwen2.5-Omni config (thinker_config.audio_config), a thinker or "
                     "Audio Flamingo 3 config (audio_config) nor an audio-encoder config (model_type one of "
                     f"{sorted(_TOWERS)})")


def _read_safetensors(folder: Path, wanted: dict[str, str]) -> dict[str, torch.Tensor]:
    """{file key -> model key} -> {model key: tensor}, opening only the shards that hold wanted keys."""
    from safetensors import safe_open

    index_file = folder / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        files = sorted({folder / weight_map[k] for k in wanted if k in weight_map})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"audio encoder folder {folder} holds no *.safetensors with the audio tower's tensors")
    state = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in wanted.keys() & set(f.keys()):
                    state[wanted[key]] = f.get_tensor(key)
        except Exception as e:  # safetensors' own error does not say which file
            raise ValueError(f"{file}: not a valid safetensors file ({type(e).__name__}: {e}); it is truncated or "
                             "corrupt: copy or download it again") from None
    return state


class AudioAdapter(nn.Module):
    """Encoder features -> LM hidden size. ``linear``: one Linear (released UALM code); ``mlp``: Linear-GELU-Linear
    (the paper). ``fc2`` is None for ``linear``."""

    def __init__(self, in_dim: int, hidden_size: int, kind: str = "linear"):
        super().__init__()
        if kind not in ("linear", "mlp"):
            raise ConfigError(f"model.audio_in.adapter={kind!r}: choose 'linear' or 'mlp'")
        self.fc1 = nn.Linear(in_dim, hidden_size)
        self.fc2 = nn.Linear(hidden_size, hidden_size) if kind == "mlp" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [n, in_dim] -> [n, hidden]."""
        x = self.fc1(x)
        if self.fc2 is not None:
            x = self.fc2(nn.functional.gelu(x))
        return x


class AudioInput(nn.Module):
    """Frozen encoder + trainable adapter: padded log-mel clips -> one row of LM embeddings per 25 Hz frame."""

    def __init__(self, cfg: AudioInputConfig, hidden_size: int, encoder: FrozenAudioEncoder | None = None):
        super().__init__()
        self.encoder = encoder if encoder is not None else build_audio_encoder(cfg)
        self.adapter = AudioAdapter(self.encoder.output_dim, hidden_size, cfg.adapter)

    def forward(self, features: torch.Tensor, feature_lens: torch.Tensor) -> torch.Tensor:
        """features [N, n_mel, F_max], feature_lens [N] -> [sum_i num_encoder_frames_from_mel(feature_lens[i]), hidden].

        Rows are the clips' frames concatenated in clip order (the order placeholders appear in the batch).
        """
        if features.shape[0] == 0:
            return self.adapter.fc1.weight.new_zeros(0, self.adapter.fc1.out_features)
        enc = self.encoder(features, feature_lens)  # [n, output_dim], no grad
        return self.adapter(enc.to(self.adapter.fc1.weight.dtype))


def splice_audio_embeddings(embeddings: torch.Tensor, placeholder_mask: torch.Tensor,
                            audio_embeddings: torch.Tensor) -> torch.Tensor:
    """Write audio embeddings over the placeholder positions of a sequence-first embedding tensor.

    Args:
        embeddings: [s, b, h] token embeddings (Megatron sequence-first layout).
        placeholder_mask: [b, s] bool, True at audio placeholder positions.
        audio_embeddings: [n, h] with n == placeholder_mask.sum(); row k goes to the k-th True of the mask in
            batch-major, then sequence order (the order of ``placeholder_mask.nonzero()``), i.e. clips in the
            order they appear in the batch, which is the row order of :class:`AudioInput`'s output.

    Returns:
        [s, b, h], a new tensor (out-of-place, differentiable w.r.t. ``embeddings`` and ``audio_embeddings``), in
        ``embeddings``' dtype.

    Example (s=4, b=2, ``P`` placeholder; rows a0..a2)::

        mask  b0: . P P .      out  b0: e a0 a1 e
              b1: P . . .           b1: a2 e e  e
    """
    s, b, h = embeddings.shape
    if placeholder_mask.shape != (b, s):
        raise ValueError(f"placeholder_mask must be [b={b}, s={s}], got {list(placeholder_mask.shape)}")
    if audio_embeddings.dim() != 2 or audio_embeddings.shape[1] != h:
        raise ValueError(f"audio_embeddings must be [n, h={h}], got {list(audio_embeddings.shape)}")
    n_slots = int(placeholder_mask.sum())
    if n_slots != audio_embeddings.shape[0]:
        raise ValueError(f"{n_slots} audio placeholder positions but {audio_embeddings.shape[0]} audio embeddings")
    batch_idx, seq_idx = placeholder_mask.nonzero(as_tuple=True)  # [n] each, batch-major order
    return embeddings.index_put((seq_idx, batch_idx), audio_embeddings.to(embeddings.dtype))
