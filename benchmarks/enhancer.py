"""Enhancement VAE speed: real-time factor of inference (seconds of 48 kHz audio made per second of compute) and
training step time, at the full-size config (about 149 M parameters) and the tiny one, on CPU and on a GPU when
there is one. Random weights: speed does not depend on them.

  python benchmarks/enhancer.py [--seconds 10] [--threads 2] [--steps 3] [--batch 4] [--segment 1.28]
"""

from __future__ import annotations

import argparse
import time

import torch

from ualm_nemo.enhance.config import EnhancerConfig, LossWeights, tiny_config
from ualm_nemo.enhance.discriminator import MultiScaleSTFTDiscriminator
from ualm_nemo.enhance.inference import Enhancer
from ualm_nemo.enhance.losses import GeneratorLoss, discriminator_hinge
from ualm_nemo.enhance.model import EnhancementVAE, parameter_count


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def inference_rtf(config: EnhancerConfig, seconds: float, device: torch.device, dtype: torch.dtype) -> float:
    enhancer = Enhancer(EnhancementVAE(config), chunk_seconds=10.0, overlap_seconds=1.0, device=device, dtype=dtype)
    wav = torch.randn(1, 1, int(16000 * seconds)) * 0.1
    enhancer.enhance(wav[..., :16000])  # warm-up
    sync(device)
    start = time.perf_counter()
    enhancer.enhance(wav)
    sync(device)
    return seconds / (time.perf_counter() - start)


def train_step_seconds(config: EnhancerConfig, batch: int, segment: float, steps: int, device: torch.device) -> float:
    vae, disc = EnhancementVAE(config).to(device), MultiScaleSTFTDiscriminator(config.out_channels).to(device)
    loss_fn = GeneratorLoss(LossWeights()).to(device)
    opt_g, opt_d = torch.optim.AdamW(vae.parameters()), torch.optim.AdamW(disc.parameters())
    x = torch.randn(batch, 1, int(16000 * segment), device=device) * 0.1
    y = torch.randn(batch, 2, 3 * x.shape[-1], device=device) * 0.1
    times = []
    for i in range(steps + 1):
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = vae(x, noise=torch.randn(batch, config.latent_dim, vae.latent_frames(x.shape[-1]), device=device))
            d_real, d_fake, _, _ = disc(y, out.audio.detach())
            loss_d = discriminator_hinge(d_real, d_fake)
        opt_d.zero_grad()
        loss_d.backward()
        opt_d.step()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            total, _ = loss_fn(out.audio, y, out.kl, disc(y, out.audio))
        opt_g.zero_grad()
        total.backward()
        opt_g.step()
        sync(device)
        if i:  # the first step warms up
            times.append(time.perf_counter() - start)
    return sum(times) / len(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="audio length for inference")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--segment", type=float, default=1.28)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for name, config in (("full", EnhancerConfig()), ("tiny", tiny_config())):
        print(f"{name}: {parameter_count(EnhancementVAE(config)) / 1e6:.2f} M parameters")
        for device in devices:
            where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {args.threads} threads"
            dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
            for dtype in dtypes:
                rtf = inference_rtf(config, args.seconds, device, dtype)
                print(f"  inference on {where} ({str(dtype).removeprefix('torch.')}): {rtf:.2f}x real time "
                      f"({args.seconds:g} s of 16 kHz in, 48 kHz stereo out)")
            step = train_step_seconds(config, args.batch, args.segment, args.steps, device)
            print(f"  training step on {where}: {step:.2f} s (batch {args.batch} x {args.segment:g} s, "
                  "VAE + discriminator updates)")


if __name__ == "__main__":
    main()
