"""The READMEs' commands as a new user types them after `make demo`, so the READMEs cannot drift from the code.

Every shell command of README.md's and launcher/README.md's fenced blocks (```bash blocks, and ``$ `` lines of the
others; ``\\`` continuations joined, comments dropped, shell variables set in the block expanded) is checked:

* it follows the READMEs' one convention: the venv's tools, ``.venv/bin/python`` / ``.venv/bin/torchrun`` /
  ``.venv/bin/pip``, never a bare ``python`` (``No module named 'torch'`` outside the venv);
* what it names exists: ``examples/*.py``, ``-m`` modules, Hydra groups (``model=``, ``data=``, ``stage=``),
  ``--cluster`` presets, ``make`` targets;
* it runs as far as it can without the data it names: an argparse command's real parser parses the README's
  arguments (``--help`` prints its usage); a Hydra command's overrides compose into a valid run config;
  ``launcher.plan`` prints exactly the README's output; ``launcher.submit`` with ``--dry-run`` finds nothing
  wrong but the paths that do not exist on this machine.

Commands holding a ``...`` placeholder get the first two checks only.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from ualm_nemo.testing.examples import Parsed as _Parsed, load_example, parse_only as _parse_only

ROOT = Path(__file__).resolve().parents[1]
READMES = (ROOT / "README.md", ROOT / "launcher" / "README.md")
TOOLS = ("python", "python3", "torchrun", "pip", "pip3")
VENV = ".venv/bin/"
HYDRA_SCRIPTS = {"train.py": "train", "score_reference.py": "train", "train_enhancer.py": "enhancer"}
PATH_PROBLEMS = re.compile(r"no such .*(on this host|file)|has no shards/ folder|is empty")


@dataclass
class Command:
    where: str  # README.md:LINE
    text: str  # variables expanded, comments dropped
    output: list[str]  # the lines printed after a ``$ `` command in its block (launcher.plan's sample)

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.text)


def _blocks(path: Path):
    """(language, first line number, lines) of every fenced block."""
    lang, start, lines = None, 0, []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("```"):
            if lang is None:
                lang, start, lines = line[3:].strip(), number + 1, []
            else:
                yield lang, start, lines
                lang = None
        elif lang is not None:
            lines.append(line)


def _logical_lines(start: int, lines: list[str]):
    """(line number, text) with ``\\`` continuations and open quotes joined, comments dropped."""
    pending, first = "", start
    for number, line in enumerate(lines, start):
        if not pending:
            first = number
        pending = f"{pending}\n{line}" if pending else line
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        text = _drop_comment(pending).strip()
        try:
            shlex.split(text)
        except ValueError:  # a quote still open: the string goes on on the next line
            continue
        if text:
            yield first, text
        pending = ""


def _drop_comment(text: str) -> str:
    """``text`` up to a ``#`` that starts a word outside quotes."""
    quote = None
    for i, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or text[i - 1].isspace()):
            return text[:i]
    return text


def readme_commands() -> list[Command]:
    commands = []
    for path in READMES:
        name = path.relative_to(ROOT)
        for lang, start, lines in _blocks(path):
            if lang in ("bash", "sh"):
                variables: dict[str, str] = {}
                for number, line in _logical_lines(start, lines):
                    for text in re.split(r"\s*(?:&&|;)\s+", line):  # a && b; c
                        text = re.sub(r"\$(\w+)", lambda m: variables.get(m.group(1), m.group(0)), text)
                        words = shlex.split(text)
                        if len(words) == 1 and re.fullmatch(r"[A-Z_]+=.*", words[0], re.S):  # T=examples/train.py
                            key, value = words[0].split("=", 1)
                            variables[key] = value
                        else:
                            commands.append(Command(f"{name}:{number}", text, []))
            elif any(line.startswith("$ ") for line in lines):  # a sample session: command, then its output
                body = [line[2:] if line.startswith("$ ") else line for line in lines]
                joined = list(_logical_lines(start, body[:_command_end(body) + 1]))
                number, text = joined[0]
                commands.append(Command(f"{name}:{number}", text, body[_command_end(body) + 1:]))
    return commands


def _command_end(lines: list[str]) -> int:
    end = 0
    while lines[end].endswith("\\"):
        end += 1
    return end


COMMANDS = readme_commands()


def _tool_words(command: Command) -> list[str]:
    """Every word of the command that names python / torchrun / pip (also inside ``sbatch --wrap "..."``)."""
    words = []
    for word in command.argv:
        for inner in word.split():
            if Path(inner).name in TOOLS:
                words.append(inner)
    return words


def test_the_readmes_hold_the_commands_this_test_checks():
    """The parser finds the commands (a README reshaped so that none is found would pass every check)."""
    texts = [c.text for c in COMMANDS]
    assert len(COMMANDS) > 40
    assert any("launcher.plan" in t for t in texts) and any("--help" in t for t in texts)
    assert any("examples/score_reference.py" in t and "stage=dpo" in t for t in texts)  # $M $D expanded


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.where)
def test_command_uses_the_venv_and_names_what_exists(command):
    argv = command.argv
    bare = [w for w in _tool_words(command) if not w.startswith(VENV)]
    assert not bare, f"{command.where}: {bare} outside the venv (write {VENV}{Path(bare[0]).name}): {command.text}"
    text = " ".join(argv)
    for script in re.findall(r"\bexamples/[\w.]+\.py\b", text):
        assert (ROOT / script).is_file(), f"{command.where}: no {script}"
    for module in re.findall(r"-m ([\w.]+)", text):
        if module.split(".")[0] in ("launcher", "ualm_nemo"):
            assert (ROOT / f"{module.replace('.', '/')}.py").is_file(), f"{command.where}: no module {module}"
    for group, option in re.findall(r"(?:^|\s)(model|data|stage)=([\w.-]+)(?=\s|$)", text):
        assert (ROOT / "conf" / group / f"{option}.yaml").is_file(), f"{command.where}: no conf/{group}/{option}"
    for preset in re.findall(r"--cluster ([\w-]+)(?=\s|$)", text):
        assert (ROOT / "conf" / "cluster" / f"{preset}.yaml").is_file(), f"{command.where}: no preset {preset}"
    if argv[0] == "make":
        targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M)
        assert set(argv[1:]) <= set(targets), f"{command.where}: no make target {argv[1:]}"


def _python_call(argv: list[str]) -> list[str] | None:
    """The ``python ...`` (or torchrun's script ...) part of a command, also inside ``sbatch --wrap``."""
    if argv[0] == "sbatch" and "--wrap" in argv:
        return _python_call(shlex.split(argv[argv.index("--wrap") + 1]))
    if Path(argv[0]).name in ("python", "python3"):
        return argv[1:]
    if Path(argv[0]).name == "torchrun":
        return [w for w in argv[1:] if not w.startswith("--")]
    return None


RUNNABLE = [c for c in COMMANDS if (call := _python_call(c.argv)) and not any("..." in w for w in call)
            and not any(w.startswith("[") for w in call[:1])]


@pytest.mark.parametrize("command", RUNNABLE, ids=lambda c: c.where)
def test_command_runs_as_written(command, monkeypatch, capsys):
    call = _python_call(command.argv)
    if call[0] == "-m":
        return _run_module(command, call[1], call[2:], capsys)
    script, args = Path(call[0]).name, [_unbracket(w) for w in call[1:]]
    if script in HYDRA_SCRIPTS:
        return _compose(command, HYDRA_SCRIPTS[script], args)
    module = load_example(Path(script).stem)
    _parse_only(monkeypatch)
    monkeypatch.setattr(sys, "argv", [script, *args])  # prepare_data / tokenize_audio read sys.argv
    main = module.main
    with pytest.raises((_Parsed, SystemExit)) as outcome:
        main(args) if main.__code__.co_argcount else main()
    if isinstance(outcome.value, SystemExit):
        out = capsys.readouterr()
        assert outcome.value.code == 0 and "--help" in args, f"{command.where}: refused: {out.err}"
        assert "usage:" in out.out


def _unbracket(word: str) -> str:
    """``[--codec``, ``/models/xcodec]``, ``[key=value]``: an optional part of a command, given here."""
    if word.startswith("[") and not word.startswith("[{"):
        word = word[1:]
    return word[:-1] if word.endswith("]") and "[" not in word else word


def _compose(command: Command, config_name: str, overrides: list[str]) -> None:
    """A Hydra script's overrides compose (keys exist, no ??? left) into a run config that validates."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from launcher.plan import compose_for_plan
    from launcher.validate import compose_run
    from ualm_nemo.enhance.config import EnhancerRun
    from ualm_nemo.training.run_config import run_config_from_dict

    OverridesParser.create().parse_overrides(overrides)  # the command line's grammar (compose() is laxer)
    if config_name == "enhancer":
        EnhancerRun.from_dict(compose_run(overrides, "enhancer"))
        return
    values, placeholders = compose_for_plan(overrides)
    assert not placeholders, f"{command.where}: leaves {placeholders} unset"
    run_config_from_dict(values).validate()


def _run_module(command: Command, module: str, args: list[str], capsys) -> None:
    if module == "launcher.plan":
        from launcher.plan import main

        assert main(args) == 0, capsys.readouterr().err
        printed = capsys.readouterr().out.splitlines()
        assert printed == command.output, f"{command.where}: the README's plan differs from the command's output"
    elif module == "launcher.submit":
        from launcher.submit import main

        code = main(args if "--dry-run" in args else [*args[:args.index("--")], "--dry-run", *args[args.index("--"):]])
        err = capsys.readouterr().err
        problems = [line.strip(" -") for line in err.splitlines() if line.startswith("  - ") or "error:" in line]
        others = [p for p in problems if not PATH_PROBLEMS.search(p) and not re.match(r"error: \d+ problems:$", p)]
        assert code in (0, 2) and not others, f"{command.where}: {err}"
    else:
        pytest.fail(f"{command.where}: no check for -m {module}")


MISSING_DOCS = re.compile(r"DESIGN\.md|shared/notes|\bnotes/[\w-]+\.md")


def test_no_reference_to_files_outside_the_repository():
    """What a user reads (READMEs, conf/, docstrings and help of examples/, launcher/, ualm_nemo/) names no file
    that the repository does not hold (DESIGN.md and the notes/ folder were a session's, never committed)."""
    found = []
    for path in [*READMES, *ROOT.glob("conf/**/*.yaml"), *ROOT.glob("examples/*.py"), *ROOT.glob("launcher/*.py"),
                 *ROOT.glob("ualm_nemo/**/*.py")]:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if MISSING_DOCS.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    for readme in READMES:
        text = readme.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)#\s]+)\)|`([\w.-]+/[\w./-]+\.md)`", text):
            name = next(t for t in target if t)
            if not name.startswith("http") and not (readme.parent / name).exists() and not (ROOT / name).exists():
                found.append(f"{readme.relative_to(ROOT)}: {name}")
    assert not found, "\n".join(found)
