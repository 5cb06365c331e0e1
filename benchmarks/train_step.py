"""The UALM training step against a plain transformers Qwen2ForCausalLM step at the same shape, in one process.

  .venv/bin/python benchmarks/train_step.py                                   # hidden 256, 4 layers, seq 512, batch 4
  .venv/bin/python benchmarks/train_step.py --attention-backend megatron      # UALM on megatron's attention
  .venv/bin/python benchmarks/train_step.py --device cuda --dtype bf16 --hidden 3584 --layers 4 --heads 28 \\
      --groups 4 --ffn 18944 --seq 4096 --batch 1                             # 7B-shaped layers on a GPU

One step = forward + backward + grad clip (1.0) + AdamW, on both sides. UALM: ``training.engine.MegatronEngine``
(one process, TP1, local layer spec, Megatron DDP and optimizer), on text rows (random text, loss on stream 0) and
text-to-audio rows (a prompt, then the delayed 8-stream audio grid, loss on every stream), every row exactly
``--seq`` long. Reference: ``Qwen2ForCausalLM`` (SDPA attention, torch AdamW) with the same decoder shape and an
output head as wide as UALM's stream-0 vocabulary (text + specials + audio rows, padded), on ``--seq`` random
tokens per row. Steps alternate (UALM, reference, UALM, ...) after ``--warmup`` untimed ones each; each figure is
the median [min, max] over ``--repeats``; the ratio is reference time / UALM time (1.0 = as fast; > 1 faster),
taken per round (a UALM step and the reference step next to it) and reported as median [min, max]: on a shared
machine a load spike then moves both steps of a round, not one side's median.

On a CPU, Megatron needs the CPU shim (``compat.cpu_shim``): its TorchFunctionMode sees every torch call of the
process. The reference is timed with the mode suspended (``device_mode_suspended``), so it is not charged for it.
On a GPU the figures add model TFLOP/s per GPU and MFU (6 x matmul parameters + 12 x layers x hidden x seq per
token, no causal halving) against the dense BF16 peak of the GPU named.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import torch

from _timing import device_name, timed

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--groups", type=int, default=2, help="KV heads (GQA)")
    p.add_argument("--ffn", type=int, default=704)
    p.add_argument("--text-vocab", type=int, default=32768, help="text rows (Qwen2.5: 151936 / 152064)")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--attention-backend", choices=["megatron", "sdpa"], default="sdpa",
                   help="the local spec's core attention (conf/model/tiny.yaml: sdpa)")
    p.add_argument("--rows", choices=["text", "tta", "both"], default="both")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    return p.parse_args(argv)


def ualm_config(args: argparse.Namespace):
    from ualm_nemo.model.config import BACKBONES, AudioInputConfig, ParallelConfig, UALMConfig

    backbone = dataclasses.replace(BACKBONES["tiny"], num_layers=args.layers, hidden_size=args.hidden,
                                   ffn_hidden_size=args.ffn, num_attention_heads=args.heads,
                                   num_query_groups=args.groups, text_vocab_size=args.text_vocab,
                                   max_position_embeddings=max(args.seq, 4096))
    return UALMConfig(backbone=backbone, audio_in=AudioInputConfig(enabled=False), params_dtype=args.dtype,
                      parallel=ParallelConfig(transformer_impl="local", use_distributed_optimizer=True),
                      attention_backend=args.attention_backend).validate(1)


def ualm_rows(cfg, kind: str, batch: int, seq: int, device: str):
    """A MicroBatch of ``batch`` rows of exactly ``seq`` positions: text (loss on stream 0) or prompt + audio
    grid."""
    from lightning.fabric.utilities import move_data_to_device

    from ualm_nemo.data.dataset import collate
    from ualm_nemo.model.vocab import IGNORE_INDEX
    from ualm_nemo.testing.batches import random_sample

    vocab, gen = cfg.vocab, torch.Generator().manual_seed(0)
    rows = []
    for _ in range(batch):
        if kind == "text":
            ids = torch.randint(0, vocab.text_vocab_size, (seq + 1,), generator=gen)
            tokens = torch.tensor([vocab.text_position_streams(int(t)) for t in ids])
            labels = torch.full_like(tokens[:-1], IGNORE_INDEX)
            labels[:, 0] = tokens[1:, 0]
            weights = torch.zeros(labels.shape)
            weights[:, 0] = 1.0
            rows.append({"tokens": tokens[:-1], "labels": labels, "loss_weights": weights, "task": "text"})
        else:
            text_len = seq // 8  # prompt, <|audio_start|>, frames + 7 delay rows, <|audio_end|> = seq
            rows.append(random_sample(vocab, text_len, seq - text_len - 2 - (vocab.num_codebooks - 1), gen))
    batch_rows = move_data_to_device(collate(rows, vocab, pad_to_multiple=1), device)
    assert batch_rows.tokens.shape[1] == seq
    return batch_rows


def build_ualm(cfg, device: str):
    from ualm_nemo.distributed.optim import OptimConfig
    from ualm_nemo.distributed.parallel import init_distributed, init_model_parallel
    from ualm_nemo.training.engine import MegatronEngine

    init_distributed()  # on a CPU: installs the shim
    init_model_parallel(cfg.parallel, seed=0)
    return MegatronEngine(cfg, OptimConfig(lr=1e-4, min_lr=1e-5, weight_decay=0.1, clip_grad=1.0), max_steps=10**6)


def build_reference(cfg, args: argparse.Namespace):
    """Qwen2ForCausalLM of UALM's decoder shape, head as wide as UALM's stream-0 vocabulary; its step."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from ualm_nemo.model.config import padded

    b = cfg.backbone
    width = padded(cfg.num_text_rows) + padded(cfg.num_audio_rows)
    hf = Qwen2Config(hidden_size=b.hidden_size, num_hidden_layers=b.num_layers, intermediate_size=b.ffn_hidden_size,
                     num_attention_heads=b.num_attention_heads, num_key_value_heads=b.num_query_groups,
                     vocab_size=width, max_position_embeddings=b.max_position_embeddings, rms_norm_eps=b.norm_eps,
                     rope_theta=b.rope_base, tie_word_embeddings=False, attn_implementation="sdpa")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = Qwen2ForCausalLM(hf).to(device=args.device, dtype=dtype).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    ids = torch.randint(0, width, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(args.device)

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def summary(seconds: list[float]) -> str:
    return f"{statistics.median(seconds) * 1e3:8.1f} ms [{min(seconds) * 1e3:.1f}, {max(seconds) * 1e3:.1f}]"


def flops_per_step(cfg, args: argparse.Namespace) -> float:
    b = cfg.backbone
    d = b.kv_channels
    per_layer = b.hidden_size * (b.num_attention_heads + 2 * b.num_query_groups) * d + b.hidden_size ** 2 \
        + 3 * b.hidden_size * b.ffn_hidden_size
    from ualm_nemo.model.config import padded

    matmul = b.num_layers * per_layer + b.hidden_size * (padded(cfg.num_text_rows) + padded(cfg.num_audio_rows))
    tokens = args.batch * args.seq
    return tokens * (6 * matmul + 12 * b.num_layers * b.hidden_size * args.seq)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from ualm_nemo.compat.cpu_shim import device_mode_suspended

    cfg = ualm_config(args)
    reference = build_reference(cfg, args)
    engine = build_ualm(cfg, args.device)
    kinds = ["text", "tta"] if args.rows == "both" else [args.rows]
    batches = {kind: ualm_rows(cfg, kind, args.batch, args.seq, args.device) for kind in kinds}
    device = device_name(args.device)
    print(f"device: {device}; torch {torch.__version__}; {args.dtype}; attention {args.attention_backend}")
    print(f"shape: hidden {args.hidden}, {args.layers} layers, {args.heads} heads / {args.groups} KV, ffn {args.ffn}, "
          f"text vocab {args.text_vocab}, seq {args.seq}, batch {args.batch}; {args.repeats} steps each after "
          f"{args.warmup} warm-up")
    times = {kind: [] for kind in [*kinds, "reference"]}

    def reference_step() -> None:
        with device_mode_suspended():
            reference()

    for i in range(args.warmup + args.repeats):
        for kind in kinds:
            seconds = timed(lambda: engine.train_step([batches[kind]]), args.device)
            if i >= args.warmup:
                times[kind].append(seconds)
        seconds = timed(reference_step, args.device)
        if i >= args.warmup:
            times["reference"].append(seconds)
    print(f"  reference (transformers Qwen2ForCausalLM) {summary(times['reference'])}")
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device), None) if args.device == "cuda" else None
    for kind in kinds:
        mine = statistics.median(times[kind])
        ratios = [r / u for r, u in zip(times["reference"], times[kind])]
        line = (f"  UALM {kind + ' rows':<37} {summary(times[kind])}   ratio {statistics.median(ratios):.2f}x "
                f"[{min(ratios):.2f}, {max(ratios):.2f}]")
        if args.device == "cuda":
            tflops = flops_per_step(cfg, args) / mine / 1e12
            line += f"   {tflops:.1f} model TFLOP/s" + (f", MFU {tflops / peak:.1%}" if peak else "")
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
