"""`launcher/` is a top-level folder next to the package (not installed): make it importable whichever way pytest
runs (``python -m pytest`` puts the repository root on sys.path, ``.venv/bin/pytest`` does not, and then this
folder, also named ``launcher``, would shadow it as a namespace package)."""

import sys
from pathlib import Path

REPO = str(Path(__file__).resolve().parents[2])
if REPO not in sys.path:
    sys.path.insert(0, REPO)
