"""TTA metric throughput: clips scored per second per metric model, at the real model sizes with random weights.

    .venv/bin/python benchmarks/evaluation.py --clips 3 --seconds 10 --device cpu

Each model is built at its published size (OpenL3 mel256-512, PaSST-S, CNN14-16k, LAION-CLAP HTSAT-tiny fusion +
roberta-base, AudioBox Aesthetics WavLM-base+), sees one warm-up clip (resampler JIT, allocator), then ``--clips``
random stereo 16 kHz clips of ``--seconds`` seconds through the metric's whole per-clip path (reading excepted:
prepare, windows, forward). Set-level statistics (FD, IS) take milliseconds and are not timed. The CLAP text
tower is timed separately (captions per second, batch of 16).

Then the share of an evaluation's time that goes to generation: the ``--gen-model`` config (random weights, the
HF-side class, KV cache) decodes ``--gen-batch`` text-to-audio requests of ``--seconds`` seconds (50 frames per
second, CFG rows included) as ``benchmarks/generation.py`` does, and its seconds per clip are set against the sum
of the metrics' seconds per clip. The X-Codec decode is not included (its weights are not built here).

    .venv/bin/python benchmarks/evaluation.py --device cuda --gen-model qwen2.5-7b --gen-batch 32 --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _timing import device_name, timed


def _builders(device: str, scratch: Path) -> dict:
    from ualm_nemo.eval import clap_score, openl3_fd, panns, passt_kl
    from ualm_nemo.eval.aesthetics import AesScorer

    def aes():
        from audiobox_aesthetics.model.aes import AesMultiOutput

        model = AesMultiOutput(target_transform={a: {"mean": 5.0, "std": 1.5} for a in ("CE", "CU", "PC", "PQ")})
        keys = ("proj_num_layer", "proj_ln", "proj_act_fn", "proj_dropout", "nth_layer", "use_weighted_layer_sum",
                "normalize_embed", "output_dim")
        torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                    "model_cfg": {k: getattr(model, k) for k in keys} | {"precision": "32"},
                    "target_transform": model.target_transform}, scratch / "aes.pt")
        scorer = AesScorer.load(scratch / "aes.pt", device=device)
        return scorer.scores

    def clap():
        from tokenizers.pre_tokenizers import ByteLevel
        from transformers import RobertaTokenizer

        vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, **{c: 4 + i for i, c in enumerate(ByteLevel.alphabet())}}
        vocab["<mask>"] = len(vocab)
        (scratch / "tok").mkdir(exist_ok=True)
        (scratch / "tok" / "vocab.json").write_text(json.dumps(vocab))
        (scratch / "tok" / "merges.txt").write_text("#version: 0.2\n")
        model, config = clap_score.build_model()  # roberta-base sized
        scorer = clap_score.ClapScorer(model, config, RobertaTokenizer.from_pretrained(str(scratch / "tok")), device)
        _builders.clap_scorer = scorer
        return scorer.audio_embedding

    return {
        "fd_openl3 (stereo)": lambda: openl3_fd.OpenL3Embedder(openl3_fd.build_model("env"), device=device).embed,
        "kl_passt": lambda: passt_kl.PasstClassifier(passt_kl.build_model(), device=device).probabilities,
        "is_panns / fd_panns": lambda: panns.PannsClassifier(panns.Cnn14(), device=device).outputs,
        "clap (audio)": clap,
        "aes": aes,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", help="comma-separated substrings of the metric names to run")
    parser.add_argument("--gen-model", default="tiny",
                        help="conf/model name generating the clips for the time share ('none': skip; default tiny)")
    parser.add_argument("--gen-batch", type=int, default=8, help="requests decoded together (default 8)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="the generating model's dtype")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    clips = [(0.1 * rng.standard_normal((2, int(args.seconds * 16000)))).astype(np.float32)
             for _ in range(args.clips + 1)]
    print(f"device: {device_name(args.device)}; {args.clips} clips of {args.seconds:g} s (stereo, 16 kHz) after one "
          "warm-up clip")
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, build in _builders(args.device, Path(scratch)).items():
            if args.only and not any(s in name for s in args.only.split(",")):
                continue
            start = time.perf_counter()
            score = build()
            built = time.perf_counter() - start
            score(clips[0], 16000)
            elapsed = timed(lambda: [score(clip, 16000) for clip in clips[1:]], args.device)
            results[name] = args.clips / elapsed
            print(f"{name:22s} {results[name]:8.3f} clips/s  ({elapsed / args.clips:6.2f} s per clip; "
                  f"built in {built:.1f} s)", flush=True)
            if name == "clap (audio)":
                captions = ["a dog barks twice in a large hall while rain falls"] * 16
                scorer = _builders.clap_scorer
                scorer.text_embeddings(captions)
                start = time.perf_counter()
                scorer.text_embeddings(captions)
                print(f"{'clap (text)':22s} {16 / (time.perf_counter() - start):8.3f} captions/s", flush=True)
    if args.gen_model != "none" and results:
        generating = generation_seconds_per_clip(args)
        scoring = sum(1 / rate for rate in results.values())
        print(f"{'generation':22s} {1 / generating:8.3f} clips/s  ({generating:6.2f} s per clip: {args.gen_model}, "
              f"batch {args.gen_batch}, {args.dtype}, {int(args.seconds * FRAME_RATE)} frames)")
        print(f"share of an evaluation's time: generation {generating / (generating + scoring):.0%}, scoring "
              f"{scoring / (generating + scoring):.0%} ({len(results)} metric models)")
    return 0


FRAME_RATE = 50  # X-Codec frames per second


def generation_seconds_per_clip(args: argparse.Namespace) -> float:
    """Seconds per clip for ``--gen-batch`` text-to-audio requests of ``--seconds`` each (generation.py's path)."""
    from generation import build, measure, model_config
    from ualm_nemo.inference.generate import make_decoder

    cfg = model_config(args.gen_model, args.dtype)
    model = build("hf", cfg, args.device)
    decoder = make_decoder(model, cfg.backbone.text_vocab_size, stop_ids=[], use_cache=True)
    options = argparse.Namespace(min_prompt=16, max_prompt=64, device=args.device)
    seconds = measure(decoder, cfg, "audio", args.gen_batch, int(args.seconds * FRAME_RATE), options)
    return seconds / args.gen_batch


if __name__ == "__main__":
    sys.exit(main())
