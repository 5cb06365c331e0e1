"""Multi-scale STFT discriminator (EnCodec-style): one 2-d conv net per STFT resolution on the complex spectrum.

Input: real and generated audio [B, C, L] (C = 1 or 2). For each resolution (n_fft; hop n_fft / 4) the complex
STFT of every channel becomes 2 input planes (real, imaginary): [B, 2C, frames, bins]. Output per resolution:
logits [B, 1, frames, bins'] (bins' = ceil over the three stride-2 frequency convs) and the feature maps of every
layer (for feature matching). Real and generated audio pass in one call so that a DDP wrapper sees one forward.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

DEFAULT_FFTS = (2048, 1024, 512, 256, 128)


class STFTScaleDiscriminator(nn.Module):
    def __init__(self, audio_channels: int, n_fft: int, filters: int = 32, dilations: tuple[int, ...] = (1, 2, 4)):
        super().__init__()
        self.n_fft, self.hop = n_fft, n_fft // 4
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        layers = [weight_norm(nn.Conv2d(2 * audio_channels, filters, (3, 9), padding=(1, 4)))]
        for d in dilations:
            layers.append(weight_norm(nn.Conv2d(filters, filters, (3, 9), stride=(1, 2), dilation=(d, 1),
                                                padding=(d, 4))))
        layers.append(weight_norm(nn.Conv2d(filters, filters, (3, 3), padding=(1, 1))))
        self.layers = nn.ModuleList(layers)
        self.post = weight_norm(nn.Conv2d(filters, 1, (3, 3), padding=(1, 1)))
        self.act = nn.LeakyReLU(0.2)

    def spectrum(self, audio: torch.Tensor) -> torch.Tensor:
        b, c, n = audio.shape
        spec = torch.stft(audio.reshape(b * c, n).float(), self.n_fft, self.hop, window=self.window,
                          return_complex=True, normalized=True)  # [B C, bins, frames]
        planes = torch.view_as_real(spec).permute(0, 3, 2, 1)  # [B C, 2, frames, bins]
        return planes.reshape(b, 2 * c, *planes.shape[2:])

    def forward(self, audio: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.spectrum(audio)
        features = []
        for layer in self.layers:
            x = self.act(layer(x))
            features.append(x)
        return self.post(x), features


class MultiScaleSTFTDiscriminator(nn.Module):
    def __init__(self, audio_channels: int = 2, ffts: tuple[int, ...] = DEFAULT_FFTS, filters: int = 32) -> None:
        super().__init__()
        self.scales = nn.ModuleList(STFTScaleDiscriminator(audio_channels, n, filters) for n in ffts)

    def forward(self, real: torch.Tensor, fake: torch.Tensor):
        """-> (logits_real, logits_fake, features_real, features_fake), each a list over resolutions."""
        both = torch.cat([real, fake])
        logits_real, logits_fake, feats_real, feats_fake = [], [], [], []
        for scale in self.scales:
            logits, feats = scale(both)
            r, f = logits.chunk(2)
            logits_real.append(r)
            logits_fake.append(f)
            feats_real.append([x.chunk(2)[0] for x in feats])
            feats_fake.append([x.chunk(2)[1] for x in feats])
        return logits_real, logits_fake, feats_real, feats_fake
