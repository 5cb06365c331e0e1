"""A resumable batch-generation output folder: items in, one wav (or text output) per item and a manifest out.

examples/generate.py uses it; so can anything else that turns a list of items (id, caption, seed, other fields)
into one file per item and must survive being killed (evaluation runs, DPO candidate generation):

* ``read_items``: items from a JSON-lines file and/or the caller; every bad line is reported, as file:line, in
  one error, before any work.
* ``OutputFolder``: ``{id}.wav`` per finished item and ``manifest.jsonl``, one line per finished item. A wav is
  written under a temporary name and renamed into place, and only then is its line appended (and flushed to
  disk): a listed item always has its whole file. A rerun skips what the manifest lists, drops a line torn by a
  kill (that item is redone), and refuses a manifest made with other settings rather than mix two runs in one
  folder. One run at a time holds the folder (flock): two runs would clean up and append over each other.

Errors are ``JobError`` (a ``ValueError``) with a message meant for the user as is; nothing here exits.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import soundfile

if TYPE_CHECKING:
    import torch

MANIFEST = "manifest.jsonl"
PARTIAL = ".wav.partial"  # temporary wavs: ".{id}.wav.partial" (ids never start with '.')
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
MAX_REPORTED = 100  # bad item lines listed in one error
ITEM_KEYS = ("id", "caption", "seed")


class JobError(ValueError):
    """Items or an output folder a run refuses; the message is meant for the user as is."""


class ManifestConflict(JobError):
    """The folder's manifest is another run's (other settings, or lines this module did not write): starting
    over (``plan(..., overwrite=True)``) or another folder resolves it."""


@dataclass(frozen=True)
class Item:
    """One thing to generate. ``id`` names its file; ``seed`` makes it reproducible alone or in any batch;
    ``extra`` holds the input line's other fields (a reference clip, a prompt group, ...) for the caller."""

    id: str
    caption: str
    seed: int
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)


def read_items(path: str | Path | None = None, more: Sequence[tuple[str, Mapping[str, Any]]] = (), *,
               first_seed: int = 0, max_chars: int = 2000, max_chars_name: str = "max_chars") -> list[Item]:
    """The JSON-lines file's items, then ``more`` ((where, fields) pairs such as ``("--caption #1", {...})``).

    A line is an object with "caption" and optionally "id" (default: the item's 0-based position, 00000, ...),
    "seed" (default: first_seed + position) and any other fields (-> ``Item.extra``). Every problem is collected
    and raised at once, each as ``where: reason``, so one pass over the file fixes them all."""
    sources: list[tuple[str, Mapping[str, Any]]] = []
    errors: list[str] = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise JobError(f"{path}: no such file")
        sources, errors = _read_jsonl(path)
        if not sources and not errors:
            raise JobError(f"{path}: no captions in the file")
    sources += list(more)
    if not sources and not errors:
        raise JobError("no items")
    items: list[Item] = []
    seen: dict[str, str] = {}
    for index, (where, obj) in enumerate(sources):
        problem, item = _item(obj, index, first_seed, max_chars, max_chars_name)
        if problem is None and item.id in seen:
            problem = f"duplicate id {item.id!r} (first at {seen[item.id]})"
        if problem is not None:
            errors.append(f"{where}: {problem}")
            continue
        seen[item.id] = where
        items.append(item)
    if errors:
        errors.sort(key=_line_order)  # file order, whichever check caught the line
        more_errors = f"\n  ... and {len(errors) - MAX_REPORTED} more" if len(errors) > MAX_REPORTED else ""
        raise JobError(f"{len(errors)} bad caption item(s):\n  " + "\n  ".join(errors[:MAX_REPORTED]) + more_errors)
    return items


def _line_order(error: str) -> tuple[int, int]:
    """Sort key of a ``where: reason`` error: file lines by number, then the other sources in their order."""
    match = re.match(r".*?:(\d+): ", error)
    return (0, int(match.group(1))) if match else (1, 0)


def _read_jsonl(path: Path) -> tuple[list[tuple[str, dict]], list[str]]:
    sources, errors = [], []
    for number, line in enumerate(path.read_bytes().split(b"\n"), 1):
        where = f"{path}:{number}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            errors.append(f"{where}: not UTF-8")
            continue
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            errors.append(f"{where}: invalid JSON ({err.msg} at column {err.colno})")
            continue
        if not isinstance(obj, dict):
            errors.append(f"{where}: expected a JSON object, got {type(obj).__name__}")
        elif "caption" not in obj:
            errors.append(f"{where}: no \"caption\"")
        else:
            sources.append((where, obj))
    return sources, errors


def _item(obj: Mapping[str, Any], index: int, first_seed: int, max_chars: int,
          max_chars_name: str) -> tuple[str | None, Item | None]:
    """(problem, None) or (None, the item)."""
    caption = obj["caption"]
    if not isinstance(caption, str):
        return f"caption must be a string, got {type(caption).__name__}", None
    if not caption.strip():
        return "empty caption", None
    if len(caption) > max_chars:
        return f"caption has {len(caption)} characters, more than {max_chars_name} {max_chars}", None
    item_id = obj.get("id", f"{index:05d}")
    if isinstance(item_id, int) and not isinstance(item_id, bool):
        item_id = str(item_id)
    if not isinstance(item_id, str) or not ID_PATTERN.fullmatch(item_id):
        return (f"id {item_id!r} cannot name a file: use 1-200 letters, digits, '.', '_' or '-', "
                "not starting with '.'"), None
    seed = obj.get("seed", first_seed + index)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 63:
        return f"seed {seed!r} must be an integer in [0, 2**63)", None
    return None, Item(item_id, caption, seed, {k: v for k, v in obj.items() if k not in ITEM_KEYS})


@dataclass
class Plan:
    """What a run does with its folder: generate ``todo`` and keep ``kept`` (id -> manifest line); the
    manifest is rewritten first when ``rewrite`` (a torn line, repeated ids, lines whose wav is gone), or
    removed with its wavs when ``overwrite``. ``notes``: what the caller should tell the user."""

    todo: list[Item]
    kept: dict[str, dict]
    done: int = 0  # requested items already finished (skipped)
    rewrite: bool = False
    overwrite: bool = False
    notes: list[str] = field(default_factory=list)


class OutputFolder:
    """A run's hold on its output folder; a context manager (the lock and the manifest close on exit).

    ``settings`` (JSON values: cfg scale, temperature, ...) go into every manifest line with the item's caption
    and seed; a finished item with other values is a conflict, not a skip. Use: ``plan`` (reads only), load the
    model, ``prepare(plan)`` (the first write), then ``add`` per finished item."""

    def __init__(self, path: str | Path, settings: Mapping[str, Any]):
        self.path = Path(path)
        self.settings = dict(settings)
        self.keys = ("caption", "seed", *self.settings)  # what a manifest line must match to count as done
        self._locks: list[int] = []
        self._manifest = None

    def __enter__(self) -> OutputFolder:
        if self.path.exists() and not self.path.is_dir():
            raise JobError(f"{self.path} exists and is not a folder")
        if self.path.is_dir():
            self._lock()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        if self._manifest is not None:
            self._manifest.close()
            self._manifest = None
        while self._locks:
            os.close(self._locks.pop())

    def read_manifest(self) -> tuple[dict[str, dict], bool, list[str]]:
        """({id: line} of the finished items (the last line per id), whether the file needs a rewrite, notes).
        A torn last line (a run killed mid-append) is dropped; a bad line elsewhere is a ManifestConflict."""
        path = self.path / MANIFEST
        if not path.is_file():
            return {}, False, []
        content = path.read_bytes()
        lines = content.split(b"\n")
        if lines[-1] == b"":
            lines.pop()
        entries: dict[str, dict] = {}
        notes: list[str] = []
        rewrite = bool(content) and not content.endswith(b"\n")  # the next line must not be glued to the last
        for number, line in enumerate(lines, 1):
            try:
                entry = json.loads(line.decode("utf-8"))
                if not isinstance(entry, dict) or not isinstance(entry.get("id"), str) or \
                        not isinstance(entry.get("audio", ""), str) or any(k not in entry for k in self.keys):
                    raise ValueError("not a manifest line")
            except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                if number == len(lines):  # the line being appended when the run was killed: that item is redone
                    notes.append(f"{path}:{number}: incomplete last line (interrupted run), ignored")
                    rewrite = True
                    continue
                raise ManifestConflict(f"{path}:{number} is not a manifest line of this command") from None
            rewrite = rewrite or entry["id"] in entries
            entries[entry["id"]] = entry
        return entries, rewrite, notes

    def plan(self, items: Sequence[Item], overwrite: bool = False) -> Plan:
        """Which items are still to do; finished ones made with other settings raise ManifestConflict.
        ``overwrite``: everything is redone and the old manifest is not even read."""
        if overwrite:
            return Plan(list(items), {}, overwrite=True)
        entries, rewrite, notes = self.read_manifest()
        conflicts = []
        for item in items:
            entry = entries.get(item.id)
            if entry is not None:
                want = {"caption": item.caption, "seed": item.seed, **self.settings}
                diff = [f"{k} {entry[k]!r} -> {want[k]!r}" for k in self.keys if entry[k] != want[k]]
                if diff:
                    conflicts.append(f"{item.id}: " + ", ".join(diff))
        if conflicts:
            shown = "; ".join(conflicts[:5]) + ("; ..." if len(conflicts) > 5 else "")
            raise ManifestConflict(f"{self.path / MANIFEST} already holds {len(conflicts)} of these items with "
                                   f"other settings ({shown})")
        kept = {}
        for item_id, entry in entries.items():
            if "audio" not in entry or readable_wav(self.path / entry["audio"]):  # text outputs live in the line
                kept[item_id] = entry
            else:  # listed but its wav is gone: redone (if requested) and dropped from the manifest
                rewrite = True
        todo = [item for item in items if item.id not in kept]
        return Plan(todo, kept, len(items) - len(todo), rewrite, notes=notes)

    def prepare(self, plan: Plan) -> None:
        """The run's first write: the folder made (and locked), leftover temporary wavs removed, the old
        manifest and its wavs removed (overwrite) or the manifest rewritten atomically with the kept lines."""
        if not self.path.is_dir():
            self.path.mkdir(parents=True)
            self._lock()
        for leftover in self.path.glob(f".*{PARTIAL}"):
            leftover.unlink()
        manifest = self.path / MANIFEST
        if plan.overwrite and manifest.exists():
            old = [line for line in manifest.read_bytes().split(b"\n") if line.strip()]
            manifest.unlink()  # first: a wav without a manifest line is not "done"
            for line in old:
                try:
                    audio = json.loads(line).get("audio")
                except (ValueError, AttributeError):
                    continue
                if isinstance(audio, str) and "/" not in audio and audio.endswith(".wav"):
                    (self.path / audio).unlink(missing_ok=True)
        elif plan.rewrite:
            tmp = self.path / f".{MANIFEST}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(entry, ensure_ascii=False) + "\n" for entry in plan.kept.values())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, manifest)
        _fsync_dir(self.path)
        self._manifest = open(manifest, "a", encoding="utf-8")

    def add(self, item: Item, wav: torch.Tensor | None = None, sample_rate: int | None = None,
            **fields: Any) -> dict:
        """The item's wav [channels, samples] written atomically (when given: text outputs such as an answer
        live in ``fields``), then its manifest line appended and flushed to disk. ``fields`` (e.g. frames, the
        prediction, the item's extra) go into the line too. Returns the line."""
        if self._manifest is None:
            raise RuntimeError("OutputFolder.add before prepare()")
        entry = {"id": item.id, "caption": item.caption, "seed": item.seed, **self.settings}
        own = {*entry, "audio", "sample_rate", "duration"}
        if own & fields.keys():
            raise ValueError(f"fields {sorted(own & fields.keys())} are the manifest's own")
        if wav is not None:
            entry.update(audio=write_wav(self.path, item.id, wav, sample_rate), sample_rate=sample_rate)
        entry.update(fields)
        if wav is not None:
            entry["duration"] = wav.shape[-1] / sample_rate
        self._manifest.write(json.dumps(entry, ensure_ascii=False) + "\n")  # only once the wav is in place
        self._manifest.flush()
        os.fsync(self._manifest.fileno())
        return entry

    def _lock(self) -> None:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise JobError(f"another run is writing to {self.path}: wait for it to finish, or use another "
                               "folder") from None
            return  # a file system without locks (some network ones): run unlocked
        self._locks.append(fd)


def write_wav(folder: Path, item_id: str, wav: torch.Tensor, sample_rate: int) -> str:
    """wav [channels, samples] -> ``{id}.wav`` (16-bit), written under a temporary name, flushed, renamed into
    place: a reader (or a resumed run) never sees half a file under the real name. Returns the file name."""
    name = f"{item_id}.wav"
    tmp = folder / f".{name}.partial"
    data = wav.detach().float().clamp(-1.0, 1.0).cpu().numpy()
    data = data[0] if data.shape[0] == 1 else data.T  # soundfile: [samples] or [samples, channels]
    with open(tmp, "wb") as f:
        soundfile.write(f, data, sample_rate, format="WAV", subtype="PCM_16")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / name)
    _fsync_dir(folder)
    return name


def readable_wav(path: Path) -> bool:
    try:
        return path.is_file() and soundfile.info(str(path)).frames > 0
    except RuntimeError:  # soundfile's errors (unreadable, truncated header)
        return False


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
