"""examples/plot_steps.py: one PNG per plotted figure of validation.jsonl and evaluation.jsonl."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from ualm_nemo.training.evaluation import EvaluationLog
from ualm_nemo.training.step_plots import series
from ualm_nemo.training.validation import ValidationLog

EXAMPLE = Path(__file__).parents[2] / "examples" / "plot_steps.py"


def _main():
    spec = importlib.util.spec_from_file_location("plot_steps", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_one_png_per_figure(tmp_path, capsys):
    for step in (2, 4, 6):
        ValidationLog(tmp_path).append(step, {"loss": 3.0 / step, "tokens": 100, "loss_tta": 1.0})
        EvaluationLog(tmp_path).append(step, {"clap": step / 10, "fd_openl3": None if step == 4 else 9.0,
                                              "qa_accuracy": 0.5, "qa_total": 2, "qa_accuracy_sound": 1.0})
    assert series(tmp_path / "evaluation.jsonl")["fd_openl3"] == [(2, 9.0), (6, 9.0)]  # nulls left out
    assert series(tmp_path / "evaluation.jsonl")["clap"] == [(2, 0.2), (4, 0.4), (6, 0.6)]
    assert _main()([str(tmp_path)]) == 0
    names = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert names == ["eval_clap.png", "eval_fd_openl3.png", "eval_qa_accuracy.png", "eval_qa_accuracy_sound.png",
                     "val_loss.png", "val_loss_tta.png"]  # counts (tokens, qa_total) are not plotted
    assert all((tmp_path / "plots" / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names)
    assert "plot: " in capsys.readouterr().out


def test_no_logs_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _main()([str(tmp_path)])
    assert "no validation.jsonl or evaluation.jsonl" in capsys.readouterr().err
