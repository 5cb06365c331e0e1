from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory) -> str:
    """One 2-step tiny pre-training run shared by the post-training chains -> its output folder."""
    from ualm_nemo.testing.dist import run_distributed
    from ualm_nemo.testing.runs import pretrain_tiny

    root = tmp_path_factory.mktemp("pretrained")
    run_distributed(1, pretrain_tiny, str(root / "pre"))
    return str(root / "pre")
