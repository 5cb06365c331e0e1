"""Frame arithmetic of the audio input path (Whisper-style log-mel -> Qwen2.5-Omni audio tower).

16 kHz audio -> 100 Hz log-mel (hop 160) -> conv stride 2 (50 Hz) -> avg-pool 2 (25 Hz). The same formulas
as transformers' Qwen2_5OmniAudioEncoder._get_feat_extract_output_lengths, kept here so the data loader can
size placeholder runs without building the encoder.
"""

from __future__ import annotations

SAMPLE_RATE = 16000
MEL_HOP = 160


def num_mel_frames(num_samples: int) -> int:
    """Valid log-mel frames for ``num_samples`` at 16 kHz: ceil(n / 160), as the Qwen2.5-Omni processor counts
    them (it pads to 30 s and reads the attention mask every hop)."""
    return max(-(-num_samples // MEL_HOP), 1)


def num_encoder_frames_from_mel(mel_frames: int) -> int:
    after_conv = (mel_frames - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


def num_encoder_frames(num_samples: int) -> int:
    """25 Hz encoder frames (= placeholder positions) for ``num_samples`` of 16 kHz audio."""
    return num_encoder_frames_from_mel(num_mel_frames(num_samples))
