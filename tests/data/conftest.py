"""Shar fixtures: a small synthetic data set prepared and written as Shar sources (fast fake codec for the loader)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from ualm_nemo.data.tokenize_stage import tokenize_source
from ualm_nemo.data.cuts import prepare_source
from ualm_nemo.data.synthetic import synthesize_demo_data
from ualm_nemo.testing.fake_codec import HashCodec

COUNTS = {"tta": 14, "understanding": 8, "text": 12}


@pytest.fixture(scope="session")
def shar_sources(tmp_path_factory) -> dict[str, str]:
    """{task: source dir} with 14 TTA / 8 understanding / 12 text samples, shards of 4 (so 4 / 2 / 3 shards)."""
    root = tmp_path_factory.mktemp("shar_data")
    manifests = synthesize_demo_data(root / "raw", num_tta=COUNTS["tta"], num_understanding=COUNTS["understanding"],
                                     num_text=COUNTS["text"], seed=3)
    out = {}
    for task, path in manifests.items():
        prepare_source(task, path, root / "prepared" / task)
        tokenize_source(root / "prepared" / task / "cuts.jsonl.gz", root / "shar" / task, HashCodec(),
                        shard_size=4, progress=False)
        out[task] = str(root / "shar" / task)
    return out
