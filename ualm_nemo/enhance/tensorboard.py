"""TensorBoard examples for the enhancer: input, output and target audio, and their log spectrograms as images."""

from __future__ import annotations

import torch

from ualm_nemo.enhance.config import INPUT_RATE, OUTPUT_RATE


def spectrogram_image(wav: torch.Tensor, n_fft: int = 1024) -> torch.Tensor:
    """[T] -> [1, bins, frames] in [0, 1] (80 dB range, low frequencies at the bottom)."""
    spec = torch.stft(wav, n_fft, n_fft // 4, window=torch.hann_window(n_fft, device=wav.device),
                      return_complex=True).abs()
    db = 20 * torch.log10(spec.clamp_min(1e-5))
    db = (db - db.max()).clamp_min(-80) / 80 + 1
    return db.flip(0)[None].cpu()


def log_examples(writer, step: int, inputs: torch.Tensor, output: torch.Tensor, target: torch.Tensor) -> None:
    """``inputs`` [1, n] at 16 kHz; ``output``, ``target`` [C, 3n] at 48 kHz (left channel and mid logged)."""
    if writer is None or not hasattr(writer, "add_audio"):
        return
    writer.add_audio("audio/input_16k", inputs[:1].clamp(-1, 1).cpu(), step, sample_rate=INPUT_RATE)
    for tag, wav in (("output", output), ("target", target)):
        mid = wav.mean(0, keepdim=True).clamp(-1, 1).cpu()
        writer.add_audio(f"audio/{tag}_mid", mid, step, sample_rate=OUTPUT_RATE)
        writer.add_image(f"spectrogram/{tag}", spectrogram_image(wav[0]), step, dataformats="CHW")
    writer.add_image("spectrogram/input_16k", spectrogram_image(inputs[0]), step, dataformats="CHW")
