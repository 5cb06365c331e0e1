"""Generation speed of both model forms: audio frames/s and text tokens/s by batch, KV cache against recompute.

  .venv/bin/python benchmarks/generation.py                                  # tiny shapes on the CPU (minutes)
  .venv/bin/python benchmarks/generation.py --models tiny,qwen2.5-0.5b --frames 64 --text-tokens 32
  .venv/bin/python benchmarks/generation.py --device cuda --dtype bf16       # tiny and 0.5B shapes by default

For each ``--models`` config (random weights, no audio input: nothing to download), builds the HF-side class
(``testing.hf_ualm.random_hf_ualm``) and the Megatron model (one process, TP1, local layer spec) and decodes
through ``generate.make_decoder`` (one ``engine.Decoder`` for both): text-to-audio requests (mode "audio", every
row makes exactly ``--frames`` frames, with its CFG row) and text requests (mode "text", no stop ids, so every
row writes exactly ``--text-tokens`` tokens), prompts of varied length, at each ``--batches`` size, with the KV
cache; then the Megatron model recomputing the whole sequence every step (``use_cache=False``) at batch 1 for
``--recompute-frames`` frames, against the KV cache at the same length. Each run is warmed up once (a short
decode at the same batch) and timed with ``time.perf_counter`` (after ``torch.cuda.synchronize`` on a GPU).
Rates count every request of the batch: frames/s = batch * frames / s. Prints one row per run, then the ratios
"batch max vs batch 1" (target >= 8x) and "kv vs recompute" (target >= 5x).

Every HF run comes before the first Megatron model is built: on a CPU, building it installs the CPU shim
(``compat.cpu_shim``), whose TorchFunctionMode then intercepts every torch call of the process.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Callable

import torch

from _timing import device_name, timed
from ualm_nemo.inference.engine import Decoder, GenerationConfig, Request
from ualm_nemo.model.config import UALMConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Run:
    model: str
    form: str  # hf / megatron
    path: str  # kv / recompute
    mode: str  # audio / text
    batch: int
    length: int  # frames or text tokens per request
    seconds: float

    @property
    def rate(self) -> float:
        return self.batch * self.length / self.seconds


def model_config(name: str, dtype: str) -> UALMConfig:
    from ualm_nemo.convert.configs import load_model_config

    return load_model_config(name, ["audio_in.enabled=false", "audio_in.encoder_path=null",
                                    "parallel.transformer_impl=local", f"params_dtype={dtype}"])


def build(form: str, cfg: UALMConfig, device: str) -> torch.nn.Module:
    if form == "hf":
        from ualm_nemo.testing.hf_ualm import random_hf_ualm

        return random_hf_ualm(cfg).to(device=device, dtype=DTYPES[cfg.params_dtype])
    from ualm_nemo.distributed.parallel import init_distributed, init_model_parallel
    from ualm_nemo.model.builder import build_model

    init_distributed()  # on a CPU: installs the CPU shim first
    init_model_parallel(cfg.parallel, seed=0)
    return build_model(cfg, device=device).eval()


def requests(cfg: UALMConfig, batch: int, mode: str, min_prompt: int, max_prompt: int) -> list[Request]:
    """``batch`` random-text prompts, lengths spread evenly over [min_prompt, max_prompt]."""
    v, gen = cfg.vocab, torch.Generator().manual_seed(batch)
    out = []
    for i in range(batch):
        length = min_prompt + (max_prompt - min_prompt) * i // max(batch - 1, 1)
        ids = torch.randint(0, min(v.text_vocab_size, 256), (length,), generator=gen).tolist()
        out.append(Request(prompt=torch.tensor([v.text_position_streams(t) for t in ids]), mode=mode, seed=i))
    return out


def measure(decoder: Decoder, cfg: UALMConfig, mode: str, batch: int, length: int, args: argparse.Namespace) -> float:
    """Seconds to decode ``batch`` requests of ``length`` frames / tokens each (after one short warm-up)."""
    def gen_cfg(n: int) -> GenerationConfig:
        if mode == "audio":
            return GenerationConfig(min_frames=n, max_frames=n, max_text_tokens=1)
        return GenerationConfig(max_text_tokens=n, max_audio_segments=0)

    reqs = requests(cfg, batch, mode, args.min_prompt, args.max_prompt)
    decoder.generate(reqs, gen_cfg(min(4, length)))  # warm-up: same batch, a few steps
    results: list = []
    seconds = timed(lambda: results.extend(decoder.generate(reqs, gen_cfg(length))), args.device)
    got = [r.audio[0].shape[0] if mode == "audio" else len(r.text_ids) for r in results]
    if got != [length] * batch:
        raise RuntimeError(f"{mode} batch {batch}: expected {length} per request, got {got}")
    return seconds


def bench_form(name: str, form: str, args: argparse.Namespace, log: Callable[[Run], None]) -> None:
    from ualm_nemo.inference.generate import make_decoder

    cfg = model_config(name, args.dtype)
    model = build(form, cfg, args.device)
    for use_cache in (True, False) if form == "megatron" else (True,):
        decoder = make_decoder(model, cfg.backbone.text_vocab_size, stop_ids=[], use_cache=use_cache)
        path = "kv" if use_cache else "recompute"
        if not use_cache:  # batch 1 audio only, and the KV cache at the same length when that differs
            if args.recompute_frames != args.frames:
                log(Run(name, form, "kv", "audio", 1, args.recompute_frames,
                        measure(make_decoder(model, cfg.backbone.text_vocab_size, [], True), cfg, "audio", 1,
                                args.recompute_frames, args)))
            log(Run(name, form, path, "audio", 1, args.recompute_frames,
                    measure(decoder, cfg, "audio", 1, args.recompute_frames, args)))
            continue
        for mode, length in (("audio", args.frames), ("text", args.text_tokens)):
            for batch in args.batches:
                log(Run(name, form, path, mode, batch, length, measure(decoder, cfg, mode, batch, length, args)))
    del model


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="tiny,qwen2.5-0.5b" if cuda else "tiny",
                   help="comma list of conf/model names (default: tiny on CPU, tiny,qwen2.5-0.5b with CUDA)")
    p.add_argument("--device", default="cuda" if cuda else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="parameter dtype (default fp32)")
    p.add_argument("--batches", default="1,8,32", help="comma list of batch sizes (default 1,8,32)")
    p.add_argument("--frames", type=int, default=256, help="audio frames per request (default 256)")
    p.add_argument("--text-tokens", type=int, default=128, help="text tokens per request (default 128)")
    p.add_argument("--recompute-frames", type=int, default=256, help="frames of the recompute run (default 256)")
    p.add_argument("--min-prompt", type=int, default=16, help="shortest prompt in positions (default 16)")
    p.add_argument("--max-prompt", type=int, default=64, help="longest prompt in positions (default 64)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not cuda:
        p.error("--device cuda: CUDA is not available")
    models = args.models.split(",")
    print(f"device: {device_name(args.device)}; torch {torch.__version__}; "
          f"dtype {args.dtype}; prompts {args.min_prompt}-{args.max_prompt} positions", flush=True)
    runs: list[Run] = []
    header = (f"{'model':<14} {'form':<9} {'path':<10} {'mode':<6} {'batch':>5} {'length':>6} {'seconds':>8} "
              f"{'rate':>14}")
    print(header + "\n" + "-" * len(header), flush=True)

    def log(run: Run) -> None:
        runs.append(run)
        unit = "frames/s" if run.mode == "audio" else "tokens/s"
        print(f"{run.model:<14} {run.form:<9} {run.path:<10} {run.mode:<6} {run.batch:>5} {run.length:>6} "
              f"{run.seconds:>8.2f} {run.rate:>9.1f} {unit}", flush=True)

    start = time.perf_counter()
    for form in ("hf", "megatron"):  # every HF run before the CPU shim exists (see the module docstring)
        for name in models:
            bench_form(name, form, args, log)
    print("\nratios")
    lo, hi = min(args.batches), max(args.batches)
    for name in models:
        for form in ("hf", "megatron"):
            for mode in ("audio", "text"):
                rate = {r.batch: r.rate for r in runs if (r.model, r.form, r.path, r.mode) == (name, form, "kv", mode)
                        and r.length == (args.frames if mode == "audio" else args.text_tokens)}
                if lo in rate and hi in rate and lo != hi:
                    print(f"  {name:<14} {form:<9} {mode:<6} batch {hi} vs batch {lo}: {rate[hi] / rate[lo]:6.1f}x"
                          f"   (target >= 8x)")
        kv, re = (next(r for r in runs if (r.model, r.form, r.path, r.mode, r.batch, r.length)
                       == (name, "megatron", path, "audio", 1, args.recompute_frames)) for path in ("kv", "recompute"))
        print(f"  {name:<14} megatron  audio  kv vs recompute at {args.recompute_frames} frames, batch 1: "
              f"{kv.rate / re.rate:6.1f}x   (target >= 5x)")
    print(f"\nwall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
