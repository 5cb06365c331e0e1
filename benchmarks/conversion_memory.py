"""Peak memory (RSS) of the HF <-> UALM converters, against the model's size and the largest HF shard.

  .venv/bin/python benchmarks/conversion_memory.py --model qwen2.5-0.5b
  .venv/bin/python benchmarks/conversion_memory.py --model qwen2.5-1.5b --max-shard-size 2GB

Writes (once, under --out) a random HF Qwen2 folder of the model's backbone in bf16 (random N(0, 0.02)
tensors, streamed to disk), then runs, each in a fresh process measured with ``os.wait4`` (its own peak RSS):

  baseline   python + the imports a conversion does (torch, megatron-core, transformers), builds the model
             description (never touched), converts nothing
  import     examples/convert_hf_to_ualm.py  (HF folder -> dist checkpoint)
  export     examples/convert_ualm_to_hf.py  (dist checkpoint -> HF folder)

and prints each peak, the peak above the baseline, and that as a ratio of the model size, the largest HF
shard and the largest single tensor. The converters stream one tensor at a time: the peak above the baseline
should be a small multiple of the largest tensor, far below the model.

This process imports no torch and makes the source folder in a child: a child's peak RSS starts from its
parent's RSS at fork time, so a big parent would inflate every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30
OVERRIDES = ["audio_in.enabled=false", "audio_in.encoder_path=null", "params_dtype=bf16"]

BASELINE = """
import sys
import safetensors, transformers  # what the converters import
from ualm_nemo.convert.configs import load_model_config
from ualm_nemo.distributed.parallel import init_distributed, init_model_parallel
from ualm_nemo.model.builder import build_model

if __name__ == "__main__":
    init_distributed()
    cfg = load_model_config(sys.argv[1], sys.argv[2:]).with_parallel(
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1, sequence_parallel=False,
        transformer_impl="local")
    init_model_parallel(cfg.parallel, seed=0)
    build_model(cfg, initialize=False, device="cpu")
"""


def make_random_hf_folder(model: str, out: Path, max_shard_size: str) -> None:
    """A bf16 HF Qwen2 folder of the model's backbone with random weights, written one tensor at a time."""
    import torch

    from ualm_nemo.convert.configs import load_model_config
    from ualm_nemo.convert.exporter import parse_size
    from ualm_nemo.convert.hf_folder import ShardedWriter
    from ualm_nemo.convert.qwen2_keymap import expected_hf_shapes, qwen2_config_for

    if (out / "bench.json").is_file():
        return
    cfg = load_model_config(model, OVERRIDES)
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardedWriter(out, parse_size(max_shard_size))
    gen = torch.Generator().manual_seed(0)
    largest = 0
    for key, shape in expected_hf_shapes(cfg).items():
        tensor = torch.empty(shape, dtype=torch.float32).normal_(0.0, 0.02, generator=gen).to(torch.bfloat16)
        if "norm" in key:
            tensor.fill_(1.0)
        largest = max(largest, tensor.numel() * tensor.element_size())
        writer.add(key, tensor)
    names = writer.finish()
    hf_config = qwen2_config_for(cfg, architectures=["Qwen2ForCausalLM"])
    hf_config.dtype = "bfloat16"
    hf_config.save_pretrained(out)
    info = {"model_bytes": writer.total_bytes, "largest_tensor_bytes": largest,
            "largest_shard_bytes": max((out / n).stat().st_size for n in names), "shards": len(names)}
    (out / "bench.json").write_text(json.dumps(info))


def peak_rss(cmd: list[str]) -> tuple[int, float]:
    """(peak RSS in bytes, seconds) of one command run in a fresh process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = proc.stderr.read()  # drained while it runs (a full pipe would block the child)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    return usage.ru_maxrss * 1024, time.perf_counter() - start  # ru_maxrss is in KiB on Linux


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="qwen2.5-0.5b", help="conf/model name (default qwen2.5-0.5b)")
    p.add_argument("--max-shard-size", default="4GB", help="HF shard size of the random source (default 4GB)")
    p.add_argument("--out", default="/tmp/ualm_conversion_bench", help="work folder (reused across runs)")
    p.add_argument("--make-source-only", action="store_true", help=argparse.SUPPRESS)  # the child's job
    args = p.parse_args()
    out = Path(args.out) / args.model
    if args.make_source_only:
        make_random_hf_folder(args.model, out / "hf", args.max_shard_size)
        return

    py = sys.executable
    print(f"random bf16 HF folder for {args.model} in {out / 'hf'} ...", flush=True)
    subprocess.run([py, __file__, "--model", args.model, "--max-shard-size", args.max_shard_size, "--out", args.out,
                    "--make-source-only"], check=True, cwd=ROOT)
    info = json.loads((out / "hf" / "bench.json").read_text())
    sets = [a for o in OVERRIDES for a in ("--set", o)]
    runs = {
        "baseline": [py, "-c", BASELINE, args.model, *OVERRIDES],
        "import": [py, "examples/convert_hf_to_ualm.py", str(out / "hf"), str(out / "ualm"), "--model", args.model,
                   *sets, "--overwrite", "--no-progress"],
        "export": [py, "examples/convert_ualm_to_hf.py", str(out / "ualm"), str(out / "hf_out"), "--model",
                   args.model, *sets, "--max-shard-size", args.max_shard_size, "--overwrite", "--no-progress"],
    }
    peaks = {}
    for name, cmd in runs.items():
        peaks[name], seconds = peak_rss(cmd)
        print(f"  {name:<8} peak RSS {peaks[name] / GiB:6.2f} GiB  ({seconds:5.1f} s)", flush=True)
    print(f"model {info['model_bytes'] / GiB:.2f} GiB (bf16) in {info['shards']} shard(s); largest shard "
          f"{info['largest_shard_bytes'] / GiB:.2f} GiB; largest tensor {info['largest_tensor_bytes'] / GiB:.2f} GiB")
    for name in ("import", "export"):
        above = peaks[name] - peaks["baseline"]
        print(f"{name}: {above / GiB:.2f} GiB above the baseline = {above / info['model_bytes']:.2f} x model, "
              f"{above / info['largest_shard_bytes']:.2f} x largest shard, "
              f"{above / info['largest_tensor_bytes']:.2f} x largest tensor")


if __name__ == "__main__":
    main()
