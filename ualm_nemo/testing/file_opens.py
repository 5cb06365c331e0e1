"""Count the files a piece of code opens, through Python's audit hooks (tests and benchmarks).

``builtins.open``, ``io.open``, ``gzip.open``, ``Path.read_text`` and ``os.open`` all raise the ``"open"`` audit
event, so one hook sees every file Python code opens, whatever library opens it. Audit hooks cannot be removed:
one hook is installed on first use and forwards to the counters active at the time (none: it does nothing).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

_active: list[FileOpens] = []
_installed = False


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if event == "open" and _active:
        path = args[0]
        if isinstance(path, (str, bytes, os.PathLike)):  # an int is an already open descriptor: not a new file
            name = os.fsdecode(path)
            for counter in _active:
                counter._record(name)


class FileOpens:
    """``with FileOpens(under=folder) as opens: ...``; then ``opens.count`` and ``opens.paths`` (in order).

    ``under``: count only files inside these folders (default: every file)."""

    def __init__(self, under: str | Path | list[str | Path] | None = None) -> None:
        global _installed
        if not _installed:
            sys.addaudithook(_hook)
            _installed = True
        folders = [under] if isinstance(under, (str, Path)) else list(under or [])
        self.under = [os.path.abspath(f) for f in folders]
        self.paths: list[str] = []

    def _record(self, name: str) -> None:
        full = os.path.abspath(name)
        if not self.under or any(full == f or full.startswith(f + os.sep) for f in self.under):
            self.paths.append(full)

    @property
    def count(self) -> int:
        return len(self.paths)

    def __enter__(self) -> FileOpens:
        _active.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _active.remove(self)
