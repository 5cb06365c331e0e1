"""Hugging Face folders on disk: lazy safetensors reading, sharded streaming writing, atomic output folders.

Reading never loads a tensor before it is asked for (shapes come from the safetensors headers), and reads it
with plain file reads into a fresh tensor, not through a memory map (a mapped shard's touched pages count in the
process's RSS until it is closed: up to a whole ~4 GB shard), so a conversion holds one tensor of the source at
once, not the model. Writing streams: each tensor's bytes go to the open shard file as it is added (its header
is written into space reserved at the front once the shard is complete), so the writer holds no tensor.

An output folder is written as ``<out>.tmp-<host>-<pid>`` and renamed to ``<out>`` only once complete: a killed or
failed conversion never leaves a folder at ``<out>`` that looks complete.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Iterator

import torch

log = logging.getLogger(__name__)
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# copied from the tokenizer folder into an exported HF folder when present
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json")

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
HEADER_RESERVE = 64 * 1024  # bytes reserved for a streamed shard's header (~500 tensors; more: rewritten)


def read_header(path: Path) -> tuple[dict, int]:
    """(safetensors header without ``__metadata__``, offset of the data buffer) of one file."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= path.stat().st_size - 8:
                raise ValueError(f"header size {size} does not fit the file")
            header = json.loads(f.read(size))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(_broken(path, e)) from None
    header.pop("__metadata__", None)
    return header, 8 + size


def _broken(path: Path, err: BaseException) -> str:
    return (f"{path}: not a valid safetensors file ({type(err).__name__}: {err}); it is truncated or corrupt: "
            "copy or download it again")


def open_safetensors(path: Path, device: str | None = None):
    """safetensors' ``safe_open``, with a damaged file named (safetensors' own error does not say which)."""
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", **({"device": device} if device else {}))
    except Exception as e:  # SafetensorError (header, buffer size), OSError
        raise ValueError(_broken(path, e)) from None


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A whole (small) safetensors file as a dict, with a damaged file named."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError (header, buffer size), OSError
        raise ValueError(_broken(path, e)) from None


def read_tensor(path: Path, info: dict, data_start: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """One tensor of a safetensors file (``info``: its header entry), read with file reads (no mmap).

    ``out``: a contiguous tensor of the same dtype and shape to read into (no second buffer); else a new one.
    """
    begin, end = info["data_offsets"]
    dtype, shape = _DTYPES[info["dtype"]], tuple(info["shape"])
    if out is None:
        out = torch.empty(shape, dtype=dtype)
    elif out.dtype != dtype or tuple(out.shape) != shape or not out.is_contiguous():
        raise ValueError(f"{path}: cannot read {info['dtype']} {list(shape)} into {out.dtype} {list(out.shape)}")
    with open(path, "rb") as f:
        f.seek(data_start + begin)
        if end > begin and f.readinto(memoryview(out.reshape(-1).view(torch.uint8).numpy())) != end - begin:
            raise ValueError(f"{path}: truncated safetensors file")
    return out


class HFFolder:
    """A local HF model folder (config.json + safetensors, sharded with an index or not), read lazily."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"HF folder {self.path} does not exist")
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"HF folder {self.path} has no config.json")
        self.config = json.loads(config_file.read_text())
        self._file_of = self._weight_map()
        self._open_name: str | None = None
        self._open = None
        self._shapes: dict[str, tuple[int, ...]] | None = None
        self._headers: dict[str, tuple[dict, int]] = {}

    def _weight_map(self) -> dict[str, str]:
        index = self.path / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index} has no weight_map")
            for name in sorted(set(weight_map.values())):
                if not (self.path / name).is_file():
                    raise FileNotFoundError(f"{index} lists the shard {name}, which is missing from {self.path}")
            return dict(weight_map)
        # transformers' rule: the index, else model.safetensors (audio.safetensors beside it is not the model's)
        files = [SINGLE_FILE] if (self.path / SINGLE_FILE).is_file() else \
            sorted(p.name for p in self.path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"HF folder {self.path} holds no *.safetensors (and no {INDEX_FILE}); "
                                    "convert .bin checkpoints with transformers' save_pretrained first")
        out = {}
        for name in files:
            with open_safetensors(self.path / name) as f:
                out.update({k: name for k in f.keys()})
        return out

    def keys(self) -> list[str]:
        return list(self._file_of)

    def check_files(self) -> None:
        """Open every weight file's header (safetensors checks that the data covers it): a truncated or corrupt
        file is a ValueError naming it, before a loader (transformers) fails on it without saying which."""
        for name in sorted(set(self._file_of.values())):
            with open_safetensors(self.path / name):
                pass

    def _handle(self, key: str):
        if key not in self._file_of:
            raise KeyError(f"{self.path}: no tensor {key!r} in its safetensors")
        name = self._file_of[key]
        if name != self._open_name:  # one open shard at a time: its mapped pages are released on switching
            self.close()
            self._open = open_safetensors(self.path / name, device="cpu")
            self._open_name = name
        return self._open

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, from the safetensors headers (no tensor is read)."""
        if self._shapes is None:
            self._shapes = {}
            for name in sorted(set(self._file_of.values())):
                with open_safetensors(self.path / name) as f:
                    for key in f.keys():
                        if self._file_of.get(key) == name:
                            self._shapes[key] = tuple(f.get_slice(key).get_shape())
            missing = sorted(set(self._file_of) - set(self._shapes))
            if missing:
                raise ValueError(f"{self.path}: {INDEX_FILE} names tensors its shards do not hold, e.g. {missing[:3]}")
        return self._shapes

    def dtype(self, key: str) -> torch.dtype | None:
        """The stored dtype of a tensor (None for a dtype only safetensors itself reads)."""
        header, _ = self._header_of(key)
        return _DTYPES.get(header[key]["dtype"])

    def _header_of(self, key: str) -> tuple[dict, int]:
        if key not in self._file_of:
            raise KeyError(f"{self.path}: no tensor {key!r} in its safetensors")
        name = self._file_of[key]
        if name not in self._headers:
            self._headers[name] = read_header(self.path / name)
        header, data_start = self._headers[name]
        if key not in header:
            raise KeyError(f"{self.path / name} does not hold {key!r} (the index says it does)")
        return header, data_start

    def get(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor ``key``; read straight into ``out`` when given (same dtype and shape, contiguous)."""
        header, data_start = self._header_of(key)
        if header[key]["dtype"] not in _DTYPES:  # an exotic dtype: let safetensors read it
            tensor = self._handle(key).get_tensor(key)
            return tensor if out is None else out.copy_(tensor)
        return read_tensor(self.path / self._file_of[key], header[key], data_start, out)

    def close(self) -> None:
        self._open, self._open_name = None, None


class ShardedWriter:
    """Writes tensors to ``model-0000i-of-0000N.safetensors`` (+ index) or ``model.safetensors`` if one shard.

    Streaming: ``add`` writes the tensor's bytes to the open shard file at once and keeps no reference to it;
    a shard is started when the first tensor comes and completed by ``flush`` (its header written into the
    space reserved at the front, padded with spaces as the format allows). Shards split where a tensor would
    take the shard past ``max_shard_bytes`` (a shard always holds at least one tensor).
    """

    def __init__(self, folder: Path, max_shard_bytes: int, prefix: str = "model") -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"max shard size must be positive, got {max_shard_bytes}")
        self.folder, self.max_bytes, self.prefix = folder, max_shard_bytes, prefix
        self._file = None
        self._entries: dict[str, dict] = {}  # the open shard's header entries
        self._shard_bytes = 0
        self._written: list[tuple[str, list[str]]] = []  # (temporary file name, keys)
        self._seen: set[str] = set()
        self.total_bytes = 0

    def _shard_name(self) -> str:
        return f"{self.prefix}-part{len(self._written):05d}.safetensors"

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if key in self._seen:
            raise ValueError(f"tensor {key!r} written twice")
        if tensor.dtype not in _DTYPE_NAMES:
            raise ValueError(f"tensor {key!r}: dtype {tensor.dtype} cannot be written")
        size = tensor.numel() * tensor.element_size()
        if self._entries and self._shard_bytes + size > self.max_bytes:
            self.flush()
        if self._file is None:
            self._file = open(self.folder / self._shard_name(), "wb")
            self._file.seek(HEADER_RESERVE)
        data = tensor.detach().to("cpu").contiguous()
        if size:
            self._file.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
        self._entries[key] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                              "data_offsets": [self._shard_bytes, self._shard_bytes + size]}
        self._seen.add(key)
        self._shard_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        """Complete the open shard (write its header) and close it."""
        if self._file is None:
            return
        f, name = self._file, self._shard_name()
        self._file = None
        try:
            header = json.dumps({"__metadata__": {"format": "pt"}, **self._entries}, separators=(",", ":")).encode()
            if 8 + len(header) <= HEADER_RESERVE:
                f.seek(0)
                f.write((HEADER_RESERVE - 8).to_bytes(8, "little"))
                f.write(header + b" " * (HEADER_RESERVE - 8 - len(header)))
            else:  # header too big for the reserved space: rewrite the file with the data moved up
                f.close()
                header += b" " * (-len(header) % 8)
                src, dst = self.folder / name, self.folder / (name + ".rewrite")
                with open(src, "rb") as fin, open(dst, "wb") as fout:
                    fout.write(len(header).to_bytes(8, "little") + header)
                    fin.seek(HEADER_RESERVE)
                    shutil.copyfileobj(fin, fout, 64 * 2**20)
                os.replace(dst, src)
        finally:
            f.close()
        self._written.append((name, list(self._entries)))
        self._entries, self._shard_bytes = {}, 0

    def finish(self) -> list[str]:
        """Write the last shard, give the shards their final names and write the index. Returns file names."""
        self.flush()
        n = len(self._written)
        if n == 1:
            os.replace(self.folder / self._written[0][0], self.folder / f"{self.prefix}.safetensors")
            return [f"{self.prefix}.safetensors"]
        weight_map, names = {}, []
        for i, (tmp_name, keys) in enumerate(self._written):
            name = f"{self.prefix}-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.folder / tmp_name, self.folder / name)
            weight_map.update({k: name for k in keys})
            names.append(name)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / f"{self.prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names

    def close(self) -> None:
        """Close an open shard file without completing it (after an error; the folder is discarded)."""
        if self._file is not None:
            self._file.close()
            self._file = None


def _tmp_name(out: Path, host: str, pid: int) -> Path:
    return out.parent / f"{out.name}.tmp-{host}-{pid}"


def remove_stale_tmp_folders(out: Path) -> list[Path]:
    """Remove ``<out>.tmp-<host>-<pid>`` folders left by killed writers of this host (their pid is gone)."""
    host, removed = socket.gethostname(), []
    prefix = f"{out.name}.tmp-{host}-"
    for tmp in out.parent.glob(f"{glob.escape(prefix)}*"):
        pid = tmp.name.removeprefix(prefix)
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # alive: another export is writing there
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
        except PermissionError:
            continue  # alive, someone else's
    return removed


@contextlib.contextmanager
def atomic_folder(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``out``, on any error it is removed.

    A writer killed outright (no exception handler runs) leaves ``<out>.tmp-<host>-<pid>``, never ``out``; the
    next write to ``out`` from this host removes such folders of dead processes.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"output {out} already exists (pass overwrite / --overwrite to replace it)")
    for stale in remove_stale_tmp_folders(out):
        log.warning("removed %s, left by a killed conversion", stale)
    tmp = _tmp_name(out, socket.gethostname(), os.getpid())
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def copy_tokenizer_files(src: str | Path, dst: Path) -> list[str]:
    """Copy the tokenizer (and generation config) files found in ``src``; returns the names copied."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"tokenizer folder {src} does not exist")
    copied = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    if not copied:
        raise FileNotFoundError(f"tokenizer folder {src} holds none of {TOKENIZER_FILES}")
    for name in copied:
        shutil.copy2(src / name, dst / name)
    return copied
