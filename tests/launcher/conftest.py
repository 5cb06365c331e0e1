"""`launcher/` is a top-level folder next to the package (not installed): make it importable whichever way pytest
runs (``python -m pytest`` puts the repository root on sys.path, ``.venv/bin/pytest`` does not, and then this
folder, also named ``launcher``, would shadow it as a namespace package)."""

import sys
from pathlib import Path

REPO = str(Path(__file__).resolve().parents[2])
if REPO not in sys.path:
    sys.path.insert(0, REPO)


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def sim_cluster(tmp_path_factory):
    """A 3-node Slurm cluster in network namespaces (launcher/sim_cluster.py), its SLURM_CONF exported for the
    module's tests; removed afterwards, also when a test fails. Skipped, with the reason, where namespaces or Slurm
    cannot be made (not root, no iproute2, no apt-get)."""
    import os

    from launcher.local_slurm import SlurmUnavailable
    from launcher.sim_cluster import SimCluster

    cluster = SimCluster(tmp_path_factory.mktemp("sim_cluster"), nodes=3, cpus=4)
    try:
        cluster.start()
    except SlurmUnavailable as err:
        pytest.skip(f"no simulated multi-node cluster here: {err}")
    saved = os.environ.get("SLURM_CONF")
    os.environ.update(cluster.env)
    try:
        yield cluster
    finally:
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved
        cluster.stop()
