"""The codec stage's settings, recorded in its output (``{out}/meta/stage.json``) so a resume cannot change them.

Shard k is cuts ``[k * shard_size, (k + 1) * shard_size)``: resuming a half-written output with another shard
size, another manifest or another codec would mix two layouts and silently drop or repeat cuts. The first run
records the settings; every later run over the same folder must ask for the same ones or is refused with a
message saying how to resume or rebuild. Folders written before this file existed are checked against their
finished shards' counts and then get one.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ualm_nemo.data.shar import meta_path

SETTINGS_FILE = "stage.json"
_FLAGS = {"shard_size": "--shard-size", "num_cuts": "--cuts (its cut count)", "codec_tasks": "--codec-tasks",
          "codec": "--codec"}


class StageSettingsError(ValueError):
    """A run over an existing output asks for settings other than those it was written with."""


@dataclass(frozen=True)
class StageSettings:
    shard_size: int
    num_cuts: int  # of the prepared manifest: a different manifest gives different shards
    codec_tasks: tuple[str, ...]
    codec: str | None  # what --codec named (a resolved folder, "tiny" or None)

    def to_json(self) -> dict:
        return {**asdict(self), "codec_tasks": list(self.codec_tasks)}


def settings_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / "meta" / SETTINGS_FILE


def check_or_record(out_dir: str | Path, settings: StageSettings) -> None:
    """Record ``settings`` in a new output; refuse (StageSettingsError) if the output holds other ones."""
    path = settings_path(out_dir)
    if path.is_file():
        recorded = json.loads(path.read_text(encoding="utf-8"))
        wanted = settings.to_json()
        differ = [k for k in wanted if recorded.get(k) != wanted[k]]
        if differ:
            raise StageSettingsError(_mismatch(out_dir, recorded, wanted, differ))
        return
    _check_legacy_shards(out_dir, settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f"{SETTINGS_FILE}.{os.getpid()}.tmp")  # several array tasks may start together
    part.write_text(json.dumps(settings.to_json()) + "\n", encoding="utf-8")
    os.replace(part, path)


def _mismatch(out_dir: str | Path, recorded: dict, wanted: dict, differ: list[str]) -> str:
    changes = ", ".join(f"{_FLAGS[k]}: written with {recorded.get(k)!r}, this run {wanted[k]!r}" for k in differ)
    return (f"{out_dir} was written with other settings ({changes}); resuming would mix two shard layouts. "
            f"To resume, rerun with the recorded settings ({settings_path(out_dir)}); to rebuild, delete {out_dir} "
            "or pass a new --out.")


def _check_legacy_shards(out_dir: str | Path, settings: StageSettings) -> None:
    """An output without settings (older runs): every finished shard must hold what this shard size gives it."""
    last = (settings.num_cuts - 1) // settings.shard_size
    for meta in sorted((Path(out_dir) / "meta").glob("[0-9]*.json")):
        shard = int(meta.stem)
        data = json.loads(meta.read_text(encoding="utf-8"))
        held = int(data["num_cuts"]) + int(data["num_rejects"])
        want = 0 if shard > last else min(settings.shard_size, settings.num_cuts - shard * settings.shard_size)
        if held != want or meta != meta_path(out_dir, shard):
            raise StageSettingsError(
                f"{out_dir} holds shards written with other settings (shard {shard} has {held} cuts, "
                f"--shard-size {settings.shard_size} over {settings.num_cuts} cuts gives it {want}); to rebuild, "
                "delete it or pass a new --out; to resume, rerun with the shard size it was written with.")
