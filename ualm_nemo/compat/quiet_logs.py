"""Import-time notes of megatron-core and torch that say the same thing, said once.

On a machine without Transformer Engine, Apex or a CUDA runtime (every CPU run), importing megatron-core warns
four times that "Transformer Engine and Apex are not installed" (one per module with a fallback) and torch's
``cpp_extension`` logs "No CUDA runtime is found, using CUDA_HOME=...". All mean one thing: megatron's torch
fallbacks run. ``install()`` turns them into one line, ``FALLBACK_NOTE``, written once per process.

Megatron's DDP logs its whole bucket list (every parameter name) at INFO when a model is wrapped, and NeMo's
telemetry (OneLogger, disabled) warns twice that it is disabled: debugging detail, so ``install()`` demotes
those records to DEBUG (shown under ``logging.DEBUG`` only; ``TO_DEBUG`` lists them by logger and message).

``install()`` runs when ``ualm_nemo`` is imported (before megatron-core is), and again is a no-op.
"""

from __future__ import annotations

import logging
import sys
import warnings

FALLBACK_NOTE = ("note: no Transformer Engine, Apex or CUDA runtime here: megatron-core runs its torch fallbacks "
                 "(expected on CPU)")
FALLBACK_MESSAGES = ("Transformer Engine and Apex are not installed", "Apex is not installed",
                     "No CUDA runtime is found")
BUCKET_LOGGER = "megatron.core.distributed.param_and_grad_buffer"
CPP_EXTENSION_LOGGER = "torch.utils.cpp_extension"
TO_DEBUG = {  # logger -> the start of the messages demoted to DEBUG
    BUCKET_LOGGER: "Number of buckets",
    "nv_one_logger.api.config": "OneLogger: Setting error_handling_strategy",
    "nv_one_logger.training_telemetry.api.training_telemetry_provider": "No exporters were provided",
}

_noted = False


def is_fallback_note(message: str) -> bool:
    return any(text in message for text in FALLBACK_MESSAGES)


def note_fallback_once() -> None:
    """Write FALLBACK_NOTE to stderr the first time one of the fallback messages comes."""
    global _noted
    if not _noted:
        _noted = True
        print(FALLBACK_NOTE, file=sys.stderr)


class _FallbackFilter(logging.Filter):
    """torch's "No CUDA runtime is found" log record -> the one note."""

    def filter(self, record: logging.LogRecord) -> bool:
        if is_fallback_note(record.getMessage()):
            note_fallback_once()
            return False
        return True


class _ToDebug(logging.Filter):
    """A record of TO_DEBUG (INFO or WARNING) -> DEBUG: kept only where DEBUG is enabled."""

    def filter(self, record: logging.LogRecord) -> bool:
        prefix = TO_DEBUG.get(record.name)
        if prefix and record.levelno in (logging.INFO, logging.WARNING) and str(record.msg).startswith(prefix):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


def _showwarning(original):
    def showwarning(message, category, filename, lineno, file=None, line=None):
        if is_fallback_note(str(message)):
            note_fallback_once()
            return
        original(message, category, filename, lineno, file, line)

    showwarning.ualm_quiet = True
    return showwarning


def install() -> None:
    """Collapse the fallback warnings into one line and demote TO_DEBUG (module docstring)."""
    if not getattr(warnings.showwarning, "ualm_quiet", False):
        warnings.showwarning = _showwarning(warnings.showwarning)
    for name, flt in ((CPP_EXTENSION_LOGGER, _FallbackFilter), *((name, _ToDebug) for name in TO_DEBUG)):
        logger = logging.getLogger(name)
        if not any(isinstance(f, flt) for f in logger.filters):
            logger.addFilter(flt())
