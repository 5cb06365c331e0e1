"""Oobleck-style convolutional encoder and decoder (the Stable Audio / ETTA autoencoder family).

Strided weight-normalised 1-d convolutions with Snake activations and residual units (dilations 1, 3, 9).
Every block maps lengths exactly (``L -> L / stride`` and ``L -> L * stride``, odd strides included) so the
16 kHz input, the 50 Hz latent and the 48 kHz output stay sample-aligned.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


class Snake(nn.Module):
    """x + sin^2(alpha x) / beta with per-channel alpha and beta stored as logs (periodic inductive bias)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.log_alpha = nn.Parameter(torch.zeros(1, channels, 1))
        self.log_beta = nn.Parameter(torch.zeros(1, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha, beta = self.log_alpha.exp(), self.log_beta.exp()
        return x + torch.sin(alpha * x).pow(2) / (beta + 1e-9)


def conv(cin: int, cout: int, kernel: int, stride: int = 1, dilation: int = 1, padding: int | None = None) -> nn.Module:
    pad = dilation * (kernel - 1) // 2 if padding is None else padding
    return weight_norm(nn.Conv1d(cin, cout, kernel, stride=stride, dilation=dilation, padding=pad))


class ResidualUnit(nn.Module):
    def __init__(self, channels: int, dilation: int) -> None:
        super().__init__()
        self.body = nn.Sequential(Snake(channels), conv(channels, channels, 7, dilation=dilation),
                                  Snake(channels), conv(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _residuals(channels: int) -> list[nn.Module]:
    return [ResidualUnit(channels, d) for d in (1, 3, 9)]


class EncoderBlock(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__(*_residuals(cin), Snake(cin),
                         conv(cin, cout, 2 * stride, stride=stride, padding=math.ceil(stride / 2)))


class DecoderBlock(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        # output_padding = stride % 2 makes an odd stride map L -> L * stride exactly
        up = weight_norm(nn.ConvTranspose1d(cin, cout, 2 * stride, stride=stride, padding=math.ceil(stride / 2),
                                            output_padding=stride % 2))
        super().__init__(Snake(cin), up, *_residuals(cout))


class Encoder(nn.Sequential):
    """[B, in_channels, L] -> [B, out_dim, L / prod(strides)]."""

    def __init__(self, in_channels: int, channels: int, mults: list[int], strides: list[int], out_dim: int) -> None:
        widths = [channels * m for m in mults]
        layers: list[nn.Module] = [conv(in_channels, widths[0], 7)]
        layers += [EncoderBlock(widths[i], widths[i + 1], s) for i, s in enumerate(strides)]
        layers += [Snake(widths[-1]), conv(widths[-1], out_dim, 3)]
        super().__init__(*layers)


class Decoder(nn.Sequential):
    """[B, in_dim, F] -> [B, out_channels, F * prod(strides)]."""

    def __init__(self, in_dim: int, channels: int, mults: list[int], strides: list[int], out_channels: int) -> None:
        widths = [channels * m for m in mults]
        layers: list[nn.Module] = [conv(in_dim, widths[0], 7)]
        layers += [DecoderBlock(widths[i], widths[i + 1], s) for i, s in enumerate(strides)]
        layers += [Snake(widths[-1]), conv(widths[-1], out_channels, 7)]
        super().__init__(*layers)
