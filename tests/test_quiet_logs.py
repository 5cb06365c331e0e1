"""Import-time notes said once, megatron's DDP bucket list at DEBUG (ualm_nemo/compat/quiet_logs.py)."""

from __future__ import annotations

import inspect
import logging
import warnings

from ualm_nemo.compat import quiet_logs


def test_megatron_still_logs_its_bucket_list_at_info():
    """The guard of the demotion below: the day megatron-core changes the message, this fails."""
    from megatron.core.distributed import param_and_grad_buffer

    source = inspect.getsource(param_and_grad_buffer)
    assert param_and_grad_buffer.logger.name == quiet_logs.BUCKET_LOGGER
    assert '"Number of buckets for gradient all-reduce / reduce-scatter' in source


def test_bucket_list_is_debug_detail(caplog):
    logger = logging.getLogger(quiet_logs.BUCKET_LOGGER)
    message = "Number of buckets for gradient all-reduce / reduce-scatter: 1\nParams for bucket 1 (10 elements):"
    with caplog.at_level(logging.INFO, logger=quiet_logs.BUCKET_LOGGER):
        logger.info(message)
        logger.info("another megatron line")
    assert [r.getMessage() for r in caplog.records] == ["another megatron line"]
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger=quiet_logs.BUCKET_LOGGER):
        logger.info(message)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [("DEBUG", message)]


def test_nemo_telemetry_notes_are_debug_detail(caplog):
    """NeMo's disabled OneLogger telemetry says so twice at WARNING on every start: DEBUG now."""
    import nemo.lightning  # noqa: F401  (imports nv_one_logger, whose loggers these are)

    import importlib

    for name, prefix in list(quiet_logs.TO_DEBUG.items())[1:]:
        assert prefix in inspect.getsource(importlib.import_module(name))  # the guard: still said there
        with caplog.at_level(logging.INFO, logger=name):
            logging.getLogger(name).warning(f"{prefix} for rank (rank=0) ...")
            logging.getLogger(name).warning("a real warning")
        assert [r.getMessage() for r in caplog.records] == ["a real warning"]
        caplog.clear()


def test_fallback_notes_become_one_line(monkeypatch, capsys):
    """Megatron's four "Transformer Engine and Apex are not installed" warnings and torch's "No CUDA runtime"
    log line -> FALLBACK_NOTE once; other warnings pass through."""
    monkeypatch.setattr(quiet_logs, "_noted", False)
    passed: list[str] = []  # what reaches the previous warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        monkeypatch.setattr(warnings, "showwarning", quiet_logs._showwarning(lambda m, *args: passed.append(str(m))))
        for text in ("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.",
                     "Transformer Engine and Apex are not installed. Falling back to local implementations",
                     "something else entirely"):
            warnings.warn(text, UserWarning)
    logging.getLogger(quiet_logs.CPP_EXTENSION_LOGGER).warning("No CUDA runtime is found, using CUDA_HOME='/x'")
    err = capsys.readouterr().err
    assert err.count(quiet_logs.FALLBACK_NOTE) == 1 and passed == ["something else entirely"]
    assert "Falling back" not in err and "CUDA_HOME" not in err
