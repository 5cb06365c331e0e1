"""Core attention forward+backward time: megatron's DotProductAttention against SDPAAttention (attention_backend).

  .venv/bin/python benchmarks/attention.py                                   # hidden 256, 4 heads, seq 512, batch 4
  .venv/bin/python benchmarks/attention.py --seq 2048 --batch 1 --groups 2

One process (TP1, over ``testing.dist.run_distributed``: megatron's attention needs its parallel state), fp32 on
the CPU (or the current GPU when there is one). Two masks: causal (no mask given: megatron builds its
[s, s] mask per call, SDPA runs is_causal) and packed rows (a block-causal [b, 1, s, s] mask, two samples and
padding per row). Prints the median of ``--repeats`` timed calls after two warm-ups. On a CPU the timings go
through the CPU shim (``compat.cpu_shim``) like every megatron run here, and a shared machine makes them noisy.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from ualm_nemo.testing.dist import run_distributed


def _bench(hidden: int, heads: int, groups: int, seq: int, batch: int, repeats: int) -> dict:
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from ualm_nemo.model.attention_mask import packed_attention_mask
    from ualm_nemo.distributed.parallel import init_model_parallel
    from ualm_nemo.model.builder import transformer_config
    from ualm_nemo.model.config import BACKBONES, AudioInputConfig, UALMConfig
    from ualm_nemo.model.sdpa_attention import SDPAAttention

    torch.set_num_threads(torch.get_num_threads() if torch.cuda.is_available() else 2)
    backbone = dataclasses.replace(BACKBONES["tiny"], hidden_size=hidden, num_attention_heads=heads,
                                   num_query_groups=groups)
    cfg = UALMConfig(backbone=backbone, audio_in=AudioInputConfig(enabled=False))
    init_model_parallel(cfg.parallel, seed=0)
    config, d = transformer_config(cfg), hidden // heads
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    q = torch.randn(seq, batch, heads, d, device=device)
    k, v = (torch.randn(seq, batch, groups, d, device=device) for _ in range(2))
    first = seq * 3 // 5
    segments = torch.tensor([0] * first + [1] * (seq - first - seq // 32) + [-1] * (seq // 32), device=device)
    out = {}
    for mask_name, mask in (("causal", None), ("packed", packed_attention_mask(segments.expand(batch, seq)))):
        for cls in (DotProductAttention, SDPAAttention):
            module = cls(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
            times = []
            for _ in range(repeats + 2):
                leaves = [t.clone().requires_grad_() for t in (q, k, v)]
                start = time.perf_counter()
                module(*leaves, mask).sum().backward()
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            out[mask_name, cls.__name__] = sorted(times[2:])[repeats // 2]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--groups", type=int, default=4, help="KV groups (GQA when fewer than --heads)")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=6)
    a = parser.parse_args()
    results = run_distributed(1, _bench, a.hidden, a.heads, a.groups, a.seq, a.batch, a.repeats)[0]
    print(f"hidden {a.hidden}, heads {a.heads}, groups {a.groups}, seq {a.seq}, batch {a.batch}: fwd+bwd median")
    for (mask, name), seconds in results.items():
        print(f"  {mask:7s} {name:20s} {seconds * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
