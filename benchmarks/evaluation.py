"""TTA metric throughput: clips scored per second per metric model, at the real model sizes with random weights.

    .venv/bin/python benchmarks/evaluation.py --clips 3 --seconds 10 --device cpu

Each model is built at its published size (OpenL3 mel256-512, PaSST-S, CNN14-16k, LAION-CLAP HTSAT-tiny fusion +
roberta-base, AudioBox Aesthetics WavLM-base+), sees one warm-up clip (resampler JIT, allocator), then ``--clips``
random stereo 16 kHz clips of ``--seconds`` seconds through the metric's whole per-clip path (reading excepted:
prepare, windows, forward). Set-level statistics (FD, IS) take milliseconds and are not timed. The CLAP text
tower is timed separately (captions per second, batch of 16).
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
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    clips = [(0.1 * rng.standard_normal((2, int(args.seconds * 16000)))).astype(np.float32)
             for _ in range(args.clips + 1)]
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, {args.clips} clips of {args.seconds:g} s "
          "(stereo, 16 kHz) after one warm-up clip")
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, build in _builders(args.device, Path(scratch)).items():
            if args.only and not any(s in name for s in args.only.split(",")):
                continue
            start = time.perf_counter()
            score = build()
            built = time.perf_counter() - start
            score(clips[0], 16000)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            for clip in clips[1:]:
                score(clip, 16000)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
