"""Type check of one config section's values against its dataclass, before any arithmetic sees them.

Hydra hands over what the command line says: ``train.max_steps=abc`` arrives as the string 'abc',
``micro_batch_size=2.5`` as a float. Unchecked, they fail far away (a TypeError deep in a comparison, a batch
split that silently rounds). Here each becomes one ConfigError naming the key; whole floats become ints
(``4.0`` -> 4), ints become floats, non-finite numbers are refused. Fields of other kinds (tuples, dicts,
nested sections) are left to their own checks.

A leaf module: every config (model, run, enhancer) builds its sections here, so none imports another's package.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from typing import Any, Iterator, Literal, Mapping


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key to fix."""


class ConfigErrors(ConfigError):
    """Several problems found by one check, all listed (``problems``), so a user fixes them in one round.

    A ConfigError, so callers that catch one keep working; a single problem reads exactly as it did alone."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        text = self.problems[0] if len(self.problems) == 1 else (
            f"{len(self.problems)} problems:\n" + "\n".join(f"  - {p}" for p in self.problems))
        super().__init__(text)


class Problems:
    """Collects ConfigErrors instead of stopping at the first: ``with problems.check(): ...`` per independent
    check, then ``problems.raise_all()`` (nothing when none was found)."""

    def __init__(self) -> None:
        self.found: list[str] = []

    def add(self, message: str) -> None:
        self.found.append(message)

    @contextlib.contextmanager
    def check(self, suffix: str = "") -> Iterator[None]:
        """Record a ConfigError raised inside (each of a ConfigErrors' problems), ``suffix`` appended to each."""
        try:
            yield
        except ConfigErrors as err:
            self.found += [f"{p}{suffix}" for p in err.problems]
        except ConfigError as err:
            self.found.append(f"{err}{suffix}")

    def raise_all(self) -> None:
        if self.found:
            raise ConfigErrors(self.found)


def build_section(cls: type, values: Mapping[str, Any] | None, where: str) -> Any:
    """The dataclass ``cls`` from one config section: unknown keys and mistyped values named by dotted key."""
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(f'{where}.{k}' for k in unknown)}; "
                          f"known: {', '.join(sorted(known))}")
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{', '.join(f'{where}.{k}' for k in missing)} must be set")
    return cls(**checked_values(cls, values, where))


def checked_values(cls: type, values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``values`` with each scalar field converted to its declared type; ConfigError names a bad one."""
    hints = typing.get_type_hints(cls)
    return {key: _convert(value, hints[key], f"{where}.{key}") if key in hints else value
            for key, value in values.items()}


def _convert(value: Any, hint: Any, key: str) -> Any:
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{key} must be set (got null)")
    scalars = [t for t in options if t in (int, float, str, bool) or typing.get_origin(t) is Literal]
    if len(scalars) != len([t for t in options if t is not type(None)]):
        return value  # a tuple, dict, list or section: checked where it is used
    errors = []
    for kind in scalars:
        try:
            return _as(value, kind, key)
        except ConfigError as e:
            errors.append(str(e))
    raise ConfigError(errors[0])


def _as(value: Any, kind: Any, key: str) -> Any:
    if typing.get_origin(kind) is Literal:
        choices = typing.get_args(kind)
        if value not in choices:
            raise ConfigError(f"{key}={value!r}: choose one of {', '.join(map(repr, choices))}")
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be true or false")
        return value
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r} must be a string")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        noun = "a whole number" if kind is int else "a number"
        raise ConfigError(f"{key}={value!r} must be {noun}")
    if not math.isfinite(value):
        raise ConfigError(f"{key}={value!r} must be a finite number")
    if kind is int:
        if float(value) != int(value):
            raise ConfigError(f"{key}={value!r} must be a whole number")
        return int(value)
    return float(value)
