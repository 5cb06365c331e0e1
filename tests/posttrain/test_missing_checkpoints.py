"""A missing or empty ``train.init_from`` / ``dpo.reference_checkpoint`` stops examples/train.py and
examples/score_reference.py in one line naming the key, before any model or process group exists (the check the
launcher runs, run_config.check_input_folders). The commands run in-process (``main`` under Hydra)."""

from __future__ import annotations

import logging
import signal

import pytest

from ualm_nemo.testing.examples import load_example


@pytest.fixture()
def keep_process_state():
    """train.py installs Slurm signal handlers on import and its main configures the root logger: give pytest
    its own back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    handlers, level = logging.root.handlers[:], logging.root.level
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)
    logging.root.handlers[:], logging.root.level = handlers, level


def _refused(command: str, overrides: list[str], monkeypatch, capsys) -> str:
    # Hydra runs in this process: its logging set-up would stay on the root logger for later tests
    monkeypatch.setattr("sys.argv", [f"{command}.py", *overrides, "hydra/job_logging=none",
                                     "hydra/hydra_logging=none"])
    with pytest.raises(SystemExit) as refused:
        load_example(command).main()
    assert "Traceback" not in capsys.readouterr().err
    return str(refused.value.code)


def test_missing_or_empty_checkpoints_are_one_line(tmp_path, monkeypatch, capsys, keep_process_state):
    pairs, convs, full, empty = tmp_path / "pairs.jsonl", tmp_path / "convs.jsonl", tmp_path / "sft", tmp_path / "empty"
    pairs.write_text("{}\n")
    convs.write_text("{}\n")
    full.mkdir()
    (full / "latest").write_text("iter_0000001\n")
    empty.mkdir()
    out = f"output_dir={tmp_path / 'run'}"
    dpo = ["stage=dpo", f"data.dpo_manifest={pairs}", f"dpo.reference_logps={tmp_path / 'ref.json'}", out]
    cases = [
        ("train", ["stage=sft", f"data.sft_manifest={convs}", f"train.init_from={tmp_path / 'nope'}", out],
         f"train.init_from='{tmp_path / 'nope'}': no such initial weights folder"),
        ("train", ["stage=sft", f"data.sft_manifest={convs}", f"train.init_from={empty}", out],
         f"train.init_from='{empty}': the initial weights folder is empty"),
        ("train", [*dpo, f"train.init_from={full}", "dpo.reference=online",
                   f"dpo.reference_checkpoint={tmp_path / 'gone'}"],
         f"dpo.reference_checkpoint='{tmp_path / 'gone'}': no such reference checkpoint folder"),
        ("score_reference", [*dpo, f"train.init_from={full}", f"dpo.reference_checkpoint={tmp_path / 'gone'}"],
         f"dpo.reference_checkpoint='{tmp_path / 'gone'}': no such reference checkpoint folder"),
        ("score_reference", [*dpo, f"train.init_from={tmp_path / 'nope'}", f"dpo.reference_checkpoint={full}"],
         f"train.init_from='{tmp_path / 'nope'}': no such initial weights folder"),
    ]
    for command, overrides, message in cases:
        line = _refused(command, overrides, monkeypatch, capsys)
        assert line.startswith(f"{command}.py: error: {message}") and "\n" not in line, line
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["hydra"]  # Hydra's log of the attempts, nothing else
    assert not (tmp_path / "ref.json").exists()
