"""Load a script of examples/ as a module, so tests call its ``main(argv)`` in-process."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Callable

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load_example(name: str) -> ModuleType:
    """examples/{name}.py as a fresh module."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_ok(main: Callable[[list[str]], int], argv: list[str], capsys) -> str:
    """``main(argv)`` succeeds (0) -> its stdout (pytest's ``capsys``)."""
    assert main(argv) == 0
    return capsys.readouterr().out


def run_refused(main: Callable[[list[str]], int], argv: list[str], capsys) -> str:
    """``main(argv)`` is refused as argparse refuses (exit 2) with a message, not a traceback -> its stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


class Parsed(Exception):
    """Raised right after a command's parser accepted its arguments: nothing after parsing runs."""


def parse_only(monkeypatch) -> None:
    """Every ArgumentParser stops right after parsing (raising Parsed): a command's real parser checks its
    arguments, and nothing else of the command runs."""
    original = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        original(self, args, namespace)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
