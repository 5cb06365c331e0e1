"""The synthetic demo set as Shar sources on disk (tests): prepared, then tokenised with the tiny (real) X-Codec."""

from __future__ import annotations

from pathlib import Path


def write_demo_shar(root: str | Path, num_tta: int = 10, num_understanding: int = 6, num_text: int = 8,
                    seed: int = 1, shard_size: int = 4) -> dict[str, str]:
    """{task: shar_dir} for the tasks tta / understanding / text, each written through prepare -> tokenize."""
    from ualm_nemo.data.tokenize_stage import tokenize_source
    from ualm_nemo.codec.xcodec import CodecTokenizer, build_tiny_xcodec
    from ualm_nemo.data.cuts import prepare_source
    from ualm_nemo.data.synthetic import synthesize_demo_data

    root = Path(root)
    manifests = synthesize_demo_data(root / "raw", num_tta=num_tta, num_understanding=num_understanding,
                                     num_text=num_text, seed=seed)
    codec = CodecTokenizer(build_tiny_xcodec(seed=0))
    out = {}
    for task, manifest in manifests.items():
        prepare_source(task, manifest, root / "prepared" / task)
        tokenize_source(root / "prepared" / task / "cuts.jsonl.gz", root / "shar" / task, codec,
                        shard_size=shard_size, progress=False)
        out[task] = str(root / "shar" / task)
    return out
