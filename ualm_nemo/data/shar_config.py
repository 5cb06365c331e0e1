"""The Shar loader's keys (conf/data/shar.yaml) as a typed config, light enough for the run config to build.

The run config parses ``data.shar`` into this once (``from_dict``: unknown keys and mistyped values named as
``data.shar.<key>``); the loader (shar_dataset.py), validation, the launcher's plan and its checks all read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ualm_nemo.config_types import ConfigError, build_section
from ualm_nemo.data.blend import WEIGHTINGS, SourceSpec


@dataclass(kw_only=True)
class SharLoaderConfig:
    """conf/data/shar.yaml's loader keys; ``sources`` as SourceSpecs (dicts given here are converted)."""

    sources: list[SourceSpec]
    weighting: str = "size"  # "size": p ~ weight x samples; "fixed": p ~ weight
    seed: int = 0
    window_size: int = 256  # samples planned together: the bucketing / packing scope
    max_tokens: int = 16384  # positions per micro-batch, padding included
    seq_len: int = 4096  # longest row; longer samples are skipped (counted, logged)
    pack: bool = False  # several samples per row (segment_ids, restarted position_ids)
    max_rows: int | None = None  # cap on rows per micro-batch
    pad_to_multiple: int = 8  # unpacked batches: row length rounded up to this
    num_workers: int = 0

    def __post_init__(self) -> None:
        self.sources = [s if isinstance(s, SourceSpec) else SourceSpec(**s) for s in self.sources]
        if not self.sources:
            raise ValueError("data.shar.sources is empty: list at least one {name, shar_dir, weight}")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"data.shar.sources names must be unique, got {names}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"data.shar.weighting={self.weighting!r}: choose one of {WEIGHTINGS}")
        if self.window_size < 1 or self.max_tokens < 1 or self.seq_len < 1:
            raise ValueError("data.shar.window_size, data.shar.max_tokens and data.shar.seq_len must be positive")
        if self.pack and self.max_tokens < self.seq_len:
            raise ValueError(f"data.shar.max_tokens={self.max_tokens} must hold at least one packed row of "
                             f"data.shar.seq_len={self.seq_len} (data.seq_len unless set): raise it, or lower "
                             "data.seq_len")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str = "data.shar") -> "SharLoaderConfig":
        """``values`` (the YAML section) checked key by key; every problem a ConfigError naming its key."""
        values = dict(values)
        values["sources"] = source_specs(values.get("sources"), f"{where}.sources")
        try:
            return build_section(cls, values, where)
        except ConfigError:
            raise
        except ValueError as err:  # the loader's own rules (__post_init__): their messages name data.shar.<key>
            raise ConfigError(str(err).replace("data.shar.", f"{where}.")) from err


def source_specs(sources: Any, where: str) -> list[SourceSpec]:
    """A list of {name, shar_dir, weight} -> SourceSpecs; a bad entry named by its index."""
    if not isinstance(sources, (list, tuple)):
        raise ConfigError(f"{where} must be a list of {{name, shar_dir, weight}}, got {type(sources).__name__}")
    specs = []
    for i, source in enumerate(sources):
        if isinstance(source, SourceSpec):
            specs.append(source)
            continue
        if not isinstance(source, Mapping):
            raise ConfigError(f"{where}[{i}] must be {{name, shar_dir, weight}}, got {source!r}")
        try:
            specs.append(build_section(SourceSpec, source, f"{where}.{i}"))
        except ConfigError:
            raise
        except ValueError as err:  # SourceSpec's own rules
            raise ConfigError(f"{where}.{i} ({source.get('name')}): {err}") from None
    return specs
