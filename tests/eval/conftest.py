"""Random-weight metric models at their real sizes, saved once per session in their public checkpoint formats by
examples/make_random_metric_checkpoints.py (the command a user runs to try evaluate.py tta without the real ones)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ualm_nemo.testing.examples import load_example


@pytest.fixture(scope="session")
def metric_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("metric_models")
    assert load_example("make_random_metric_checkpoints").main([str(root / "random")]) == 0
    from ualm_nemo.testing.metric_models import METRIC_FILES

    paths = {name: root / "random" / file for name, file in METRIC_FILES.items()}
    return paths | {"clap_tokenizer": root / "random" / "roberta-tokenizer"}
