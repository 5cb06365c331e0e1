"""What ``--help`` shows a new user: each command's examples one per line, every subcommand, only its own keys."""

from __future__ import annotations

import io
import re
import sys
import tokenize
from pathlib import Path

import pytest

from ualm_nemo.testing.examples import EXAMPLES, load_example


def _help(name: str, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as done:
        load_example(name).main(argv)
    assert done.value.code == 0
    return capsys.readouterr().out


def test_no_example_joins_its_continued_command_lines():
    """A ``\\`` at a line's end inside a plain string joins the lines (generate.py --help printed its two sample
    commands as one line each with the continuation lost); raw strings keep it."""
    joined = []
    for path in sorted([*EXAMPLES.glob("*.py"), *(EXAMPLES.parent / "launcher").glob("submit.py")]):
        source = path.read_text(encoding="utf-8")
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            text = token.string
            if token.type == tokenize.STRING and not text.lstrip("bfuBFU").startswith(("r", "R")) \
                    and re.search(r"(?<!\\)(?:\\\\)*\\\n", text):
                joined.append(f"{path.name}:{token.start[0]}")
    assert not joined


def test_generate_help_shows_its_examples_on_separate_lines(capsys):
    out = _help("generate", ["--help"], capsys)
    assert "    python examples/generate.py --checkpoint demo_out/checkpoints --codec demo_out/codec \\\n" in out
    assert '\n        --caption "a high beep" --caption "white noise" --out-dir generated/\n' in out


def test_evaluate_help_lists_every_suite(capsys):
    out = _help("evaluate", ["--help"], capsys)
    assert "{understanding,tta,text}" in out and "evaluate.py text -h" in out


def test_train_enhancer_help_shows_its_own_keys_only(monkeypatch, capsys):
    """Hydra's help lists the config groups of conf/ (model=, data=, stage=, cluster=: the language model's);
    conf/hydra/help/enhancer.yaml leaves them out."""
    import runpy

    monkeypatch.setattr(sys, "argv", ["train_enhancer.py", "--help"])
    try:  # as `python examples/train_enhancer.py --help` runs it (Hydra finds conf/ from the script's path)
        runpy.run_path(str(EXAMPLES / "train_enhancer.py"), run_name="__main__")
    except SystemExit as done:
        assert done.code in (0, None)
    out = capsys.readouterr().out
    assert "python examples/train_enhancer.py train.data=DIR" in out and "discriminator_ffts" in out
    assert "Configuration groups" not in out and "qwen2.5-7b" not in out and "pretrain_blend" not in out
