"""The Hydra commands refuse an ``output_dir=`` they cannot create in one line, before Hydra makes its run
folder (which used to end in Hydra's traceback): /proc/x (nothing can be created there, even as root) and a
path under a regular file, through each command's real ``main`` in-process."""

from __future__ import annotations

import signal

import pytest

from ualm_nemo.testing.examples import load_example


@pytest.fixture()
def keep_signal_handlers():
    """train.py / train_enhancer.py install Slurm signal handlers on import: give pytest its own back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


@pytest.mark.parametrize("command", ["train", "score_reference", "train_enhancer"])
def test_an_output_dir_that_cannot_be_created_is_one_line(command, tmp_path, monkeypatch, capsys,
                                                          keep_signal_handlers):
    main = load_example(command).main
    (tmp_path / "a_file").write_text("x")
    for value, why in (("/proc/x", "/proc accepts no new folder"),
                       (str(tmp_path / "a_file" / "run"), f"{tmp_path / 'a_file'} is a file, not a folder")):
        monkeypatch.setattr("sys.argv", [f"{command}.py", f"output_dir={value}", "train.max_steps=1"])
        with pytest.raises(SystemExit) as refused:
            main()
        assert refused.value.code.startswith(f"{command}.py: error: output_dir={value!r} cannot be created: {why}")
        assert "Traceback" not in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
