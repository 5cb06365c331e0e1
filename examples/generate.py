"""Text-to-audio: captions in, one wav per caption and a manifest out (CPU by default, or one GPU).

    python examples/generate.py --checkpoint demo_out/checkpoints --codec demo_out/codec \
        --caption "a high beep" --caption "white noise" --out-dir generated/

    python examples/generate.py --checkpoint /models/ualm-7b-hf --codec /models/xcodec-hubert-general \
        --tokenizer /models/ualm-7b-hf --captions prompts.jsonl --batch-size 16 --device cuda --out-dir generated/

--checkpoint is a training checkpoint (a run's checkpoints/ folder or one iter_* folder, saved at any TP/PP) or
a folder exported by examples/convert_ualm_to_hf.py. --captions is a JSON-lines file, one object per line:

    {"caption": "a dog barks twice in a large hall", "id": "dog", "seed": 7}

``id`` and ``seed`` are optional: ids (letters, digits, '.', '_', '-': they name the wav) default to the item's
0-based position (00000, 00001, ...), seeds to --seed + position; --caption items come after the file's. Every
bad line (invalid JSON, no or empty caption, one over --max-caption-chars, a repeated id) is reported as
file:line before any model is loaded. Items are decoded --batch-size at a time (default 8); an item gives the
same audio alone or in any batch. Decoding runs on the CPU unless --device cuda is given.

--out-dir receives {id}.wav (16 kHz, 16-bit) per item and manifest.jsonl, one line per finished item:
id, caption, seed, cfg_scale, temperature, top_k, max_frames, min_frames, audio (the wav's file name),
sample_rate, frames, duration (s). A wav is written under a temporary name and renamed into place, and only then
is its manifest line appended (flushed to disk), so the manifest never lists a half-written file.

Re-running the same command resumes: items already in the manifest are skipped and the rest generated. If the
manifest holds an item with other settings (caption, seed, cfg scale, temperature, top-k, frame limits) the run
is refused; --overwrite starts over (or use a new --out-dir).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import NamedTuple

MANIFEST = "manifest.jsonl"
PARTIAL = ".wav.partial"  # temporary wavs: ".{id}.wav.partial" (ids never start with '.')
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
MAX_REPORTED = 100  # bad caption lines listed in one error
SETTINGS = ("caption", "seed", "cfg_scale", "temperature", "top_k", "max_frames", "min_frames")
# GenerationConfig field -> (CLI flag, rule), to name the flag when GenerationConfig rejects a value
FLAGS = {
    "cfg_scale": ("--cfg-scale", "must be finite and > 0"),
    "temperature": ("--temperature", "must be finite and >= 0 (0: greedy)"),
    "top_k": ("--top-k", "must be >= 0 (0: no top-k cut)"),
    "max_frames": ("--max-frames", "must be >= 1"),
    "min_frames": ("--min-frames", "must lie between 1 and --max-frames"),
}


class Item(NamedTuple):
    id: str
    caption: str
    seed: int


def parse_args(argv=None) -> argparse.Namespace:
    from ualm_nemo.inference.engine import GenerationConfig

    defaults = GenerationConfig()
    p = argparse.ArgumentParser(prog="generate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="training checkpoint (a run's checkpoints/ or one iter_* folder) or an exported HF folder")
    p.add_argument("--codec", required=True, help="local X-Codec folder (HF format)")
    p.add_argument("--tokenizer", default="byte", help="'byte' or a local Qwen tokenizer folder")
    p.add_argument("--caption", action="append", default=[], help="a caption (repeatable)")
    p.add_argument("--captions", metavar="FILE.jsonl", help='JSON lines: {"caption": ..., "id": ..., "seed": ...}')
    p.add_argument("--max-caption-chars", type=int, default=2000, help="longer captions are an error")
    p.add_argument("--out-dir", default="generated")
    p.add_argument("--batch-size", type=int, default=8, help="items decoded together")
    p.add_argument("--cfg-scale", type=float, default=defaults.cfg_scale)
    p.add_argument("--temperature", type=float, default=defaults.temperature)
    p.add_argument("--top-k", type=int, default=defaults.top_k)
    p.add_argument("--max-frames", type=int, default=defaults.max_frames, help="50 frames per second")
    p.add_argument("--min-frames", type=int, default=defaults.min_frames)
    p.add_argument("--seed", type=int, default=0, help="seed of the first item; item i gets seed + i")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--overwrite", action="store_true", help="discard the out dir's manifest and wavs, start over")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def fail(message: str) -> None:
    """One error line (no usage block, no traceback), exit status 2 like argparse's own errors."""
    print(f"generate.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


# --- validation (before any work) ------------------------------------------------------------------------
def generation_config(args: argparse.Namespace):
    """GenerationConfig from the flags; a value it rejects is reported under its CLI flag."""
    from ualm_nemo.inference.engine import GenerationConfig

    if args.batch_size < 1:
        fail(f"--batch-size {args.batch_size}: must be >= 1")
    if args.max_caption_chars < 1:
        fail(f"--max-caption-chars {args.max_caption_chars}: must be >= 1")
    if args.seed < 0:
        fail(f"--seed {args.seed}: must be >= 0")
    try:
        return GenerationConfig(cfg_scale=args.cfg_scale, temperature=args.temperature, top_k=args.top_k,
                                max_frames=args.max_frames, min_frames=args.min_frames)
    except ValueError as err:
        match = re.match(r"invalid generation setting (\w+)=", str(err))
        if not match or match.group(1) not in FLAGS:
            fail(str(err))
        key = match.group(1)
        flag, rule = FLAGS[key]
        bound = f" ({args.max_frames})" if key == "min_frames" else ""
        fail(f"{flag} {getattr(args, key)}: {rule}{bound}")


def check_paths(args: argparse.Namespace) -> None:
    if not Path(args.checkpoint).exists():
        fail(f"--checkpoint {args.checkpoint}: no such file or folder")
    if not (Path(args.codec) / "config.json").is_file():
        fail(f"--codec {args.codec}: not an X-Codec folder (no config.json)")
    if args.tokenizer != "byte" and not Path(args.tokenizer).is_dir():
        fail(f"--tokenizer {args.tokenizer}: neither 'byte' nor a folder")
    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        fail(f"--out-dir {out}: exists and is not a folder")
    import torch

    try:
        device = torch.device(args.device)
    except RuntimeError:
        fail(f"--device {args.device}: not a torch device (cpu, cuda, cuda:1, ...)")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {args.device}: CUDA is not available here (use --device cpu)")


def _caption_problem(caption, limit: int) -> str | None:
    if not isinstance(caption, str):
        return f"caption must be a string, got {type(caption).__name__}"
    if not caption.strip():
        return "empty caption"
    if len(caption) > limit:
        return f"caption has {len(caption)} characters, more than --max-caption-chars {limit}"
    return None


def read_items(args: argparse.Namespace) -> list[Item]:
    """The file's items then the --caption ones; every problem is collected and reported at once."""
    raw: list[tuple[str, dict]] = []  # (where, fields)
    errors: list[str] = []
    if args.captions:
        path = Path(args.captions)
        if not path.is_file():
            fail(f"--captions {path}: no such file")
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
                continue
            if "caption" not in obj:
                errors.append(f"{where}: no \"caption\"")
                continue
            raw.append((where, obj))
        if not raw and not errors:
            fail(f"--captions {path}: no captions in the file")
    for k, caption in enumerate(args.caption, 1):
        raw.append((f"--caption #{k}", {"caption": caption}))
    if not raw and not errors:
        fail("no captions: give --caption (repeatable) and/or --captions FILE.jsonl")

    items: list[Item] = []
    seen: dict[str, str] = {}
    for index, (where, obj) in enumerate(raw):
        problem = _caption_problem(obj["caption"], args.max_caption_chars)
        item_id = obj.get("id", f"{index:05d}")
        if problem is None and isinstance(item_id, int) and not isinstance(item_id, bool):
            item_id = str(item_id)
        if problem is None and (not isinstance(item_id, str) or not ID_PATTERN.fullmatch(item_id)):
            problem = (f"id {item_id!r} cannot name a file: use 1-200 letters, digits, '.', '_' or '-', "
                       "not starting with '.'")
        if problem is None and item_id in seen:
            problem = f"duplicate id {item_id!r} (first at {seen[item_id]})"
        seed = obj.get("seed", args.seed + index)
        if problem is None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 63):
            problem = f"seed {seed!r} must be an integer in [0, 2**63)"
        if problem is not None:
            errors.append(f"{where}: {problem}")
            continue
        seen[item_id] = where
        items.append(Item(item_id, obj["caption"], seed))
    if errors:
        shown = errors[:MAX_REPORTED]
        more = f"\n  ... and {len(errors) - MAX_REPORTED} more" if len(errors) > MAX_REPORTED else ""
        fail(f"{len(errors)} bad caption item(s):\n  " + "\n  ".join(shown) + more)
    return items


# --- the output folder: manifest, resume ------------------------------------------------------------------
def settings(item: Item, args: argparse.Namespace) -> dict:
    return {"caption": item.caption, "seed": item.seed, "cfg_scale": args.cfg_scale,
            "temperature": args.temperature, "top_k": args.top_k, "max_frames": args.max_frames,
            "min_frames": args.min_frames}


def read_manifest(out_dir: Path) -> tuple[dict[str, dict], bool]:
    """{id: entry} of the manifest's finished items (the last line per id), and whether the file needs a
    rewrite (a torn last line from a killed run, repeated ids). A bad line elsewhere is refused."""
    path = out_dir / MANIFEST
    if not path.is_file():
        return {}, False
    content = path.read_bytes()
    lines = content.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    entries: dict[str, dict] = {}
    dirty = bool(content) and not content.endswith(b"\n")  # the next line must not be glued to the last one
    for number, line in enumerate(lines, 1):
        try:
            entry = json.loads(line.decode("utf-8"))
            if not isinstance(entry, dict) or not isinstance(entry.get("id"), str) or \
                    not isinstance(entry.get("audio"), str) or any(k not in entry for k in SETTINGS):
                raise ValueError("not a manifest entry")
        except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if number == len(lines):  # the line being appended when the run was killed: that item is redone
                print(f"{path}:{number}: incomplete last line (interrupted run), ignored")
                dirty = True
                continue
            fail(f"{path}:{number} is not a manifest line of this command; use --overwrite to start over "
                 "or a new --out-dir")
        dirty = dirty or entry["id"] in entries
        entries[entry["id"]] = entry
    return entries, dirty


def plan(items: list[Item], args: argparse.Namespace, out_dir: Path) -> tuple[list[Item], dict[str, dict], bool]:
    """(items to generate, manifest entries to keep, manifest needs a rewrite). Refuses other settings."""
    if args.overwrite:
        return items, {}, False  # the old manifest and its wavs go (prepare_out_dir)
    entries, dirty = read_manifest(out_dir)
    conflicts = []
    for item in items:
        entry = entries.get(item.id)
        if entry is None:
            continue
        want = settings(item, args)
        diff = [f"{k} {entry[k]!r} -> {want[k]!r}" for k in SETTINGS if entry[k] != want[k]]
        if diff:
            conflicts.append(f"{item.id}: " + ", ".join(diff))
    if conflicts:
        fail(f"{out_dir / MANIFEST} already holds {len(conflicts)} of these items with other settings "
             f"({'; '.join(conflicts[:5])}{'; ...' if len(conflicts) > 5 else ''}): use --overwrite to start "
             "over, or a new --out-dir")
    kept = {}
    for item_id, entry in entries.items():
        if _readable(out_dir / entry["audio"]):
            kept[item_id] = entry
        else:  # listed but its wav is gone: redone (if requested) and dropped from the manifest
            dirty = True
    todo = [item for item in items if item.id not in kept]
    return todo, kept, dirty


def _readable(path: Path) -> bool:
    import soundfile

    try:
        return path.is_file() and soundfile.info(str(path)).frames > 0
    except RuntimeError:  # soundfile's errors (unreadable, truncated header)
        return False


def lock(out_dir: Path) -> int | None:
    """An exclusive lock on the out dir for this run (two runs would clean up each other's temporary wavs and
    append the same items); None where the file system has no locks (some network file systems)."""
    import errno
    import fcntl

    fd = os.open(out_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            fail(f"another run is writing to {out_dir}: wait for it to finish, or use another --out-dir")
        return None
    return fd


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prepare_out_dir(out_dir: Path, args: argparse.Namespace, kept: dict[str, dict], dirty: bool) -> None:
    """Leftover temporary wavs removed; with --overwrite the old wavs and manifest go; a manifest that needs it
    is rewritten (atomically) with the kept entries only."""
    for leftover in out_dir.glob(f".*{PARTIAL}"):
        leftover.unlink()
    manifest = out_dir / MANIFEST
    if args.overwrite and manifest.exists():
        old = [line for line in manifest.read_bytes().split(b"\n") if line.strip()]
        manifest.unlink()  # first: a wav without a manifest line is not "done"
        for line in old:
            try:
                audio = json.loads(line).get("audio")
            except (ValueError, AttributeError):
                continue
            if isinstance(audio, str) and "/" not in audio and audio.endswith(".wav"):
                (out_dir / audio).unlink(missing_ok=True)
    elif dirty:
        tmp = out_dir / f".{MANIFEST}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(entry, ensure_ascii=False) + "\n" for entry in kept.values())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, manifest)
    _fsync_dir(out_dir)


def write_wav(out_dir: Path, item_id: str, wav, sample_rate: int) -> str:
    """wav [channels, samples] -> {id}.wav, written under a temporary name and renamed into place."""
    import soundfile

    name = f"{item_id}.wav"
    tmp = out_dir / f".{name}.partial"
    data = wav.detach().float().clamp(-1.0, 1.0).cpu().numpy()
    data = data[0] if data.shape[0] == 1 else data.T  # soundfile: [samples] or [samples, channels]
    with open(tmp, "wb") as f:
        soundfile.write(f, data, sample_rate, format="WAV", subtype="PCM_16")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out_dir / name)
    _fsync_dir(out_dir)
    return name


# --- main -------------------------------------------------------------------------------------------------
def load(args: argparse.Namespace):
    """UALMInference over the checkpoint, codec and tokenizer; a folder that is not what it should be is one
    error line naming its flag."""
    import torch

    from ualm_nemo.codec.xcodec import CodecTokenizer
    from ualm_nemo.data.tokenizer import build_tokenizer
    from ualm_nemo.inference.pipeline import UALMInference, load_model

    flag = "--codec"
    try:
        codec = CodecTokenizer.from_pretrained(args.codec)
        codec.model.to(torch.device(args.device))
        flag = "--tokenizer"
        tokenizer = build_tokenizer(args.tokenizer)
        flag = "--checkpoint"
        model = load_model(args.checkpoint, args.device)
        flag = "--checkpoint/--tokenizer"
        return UALMInference(model, tokenizer, codec, batch_size=args.batch_size)
    except (FileNotFoundError, ValueError, OSError) as err:
        fail(f"{flag}: cannot load: {err}")


def main(argv=None) -> int:
    args = parse_args(argv)
    gen_cfg = generation_config(args)  # every check before any work; nothing is written when one fails
    check_paths(args)
    items = read_items(args)
    out_dir = Path(args.out_dir)
    locks: list[int | None] = [lock(out_dir) if out_dir.is_dir() else None]  # a new out dir: locked once made
    try:
        todo, kept, dirty = plan(items, args, out_dir)
        skipped = len(items) - len(todo)
        if skipped:
            print(f"resuming {out_dir}: {skipped} of {len(items)} items already done (skipped), "
                  f"{len(todo)} to generate")
        pipeline = load(args) if todo else None  # nothing in the out dir changes before the model loads
        if not out_dir.is_dir():
            out_dir.mkdir(parents=True)
            locks.append(lock(out_dir))
        prepare_out_dir(out_dir, args, kept, dirty)
        written = generate(pipeline, gen_cfg, todo, args, out_dir)
    finally:
        for fd in locks:
            if fd is not None:
                os.close(fd)
    print(f"done: {written} written, {skipped} skipped (already done), in {out_dir} ({MANIFEST})")
    return 0


def generate(pipeline, gen_cfg, todo: list[Item], args: argparse.Namespace, out_dir: Path) -> int:
    """Decode ``todo`` batch by batch; each item's wav, then its manifest line. Returns the items written."""
    from tqdm import tqdm

    written = 0
    with open(out_dir / MANIFEST, "a", encoding="utf-8") as manifest, \
            tqdm(total=len(todo), desc="generating", unit="clip", disable=args.no_progress) as bar:
        for start in range(0, len(todo), args.batch_size):
            chunk = todo[start:start + args.batch_size]
            replies = pipeline.text_to_audio([i.caption for i in chunk], [i.seed for i in chunk], gen_cfg)
            for item, reply in zip(chunk, replies):
                if not reply.audio:
                    raise RuntimeError(f"item {item.id}: the model returned no audio (stop={reply.stop!r})")
                audio = reply.audio[0]
                name = write_wav(out_dir, item.id, audio.wav, audio.sample_rate)
                entry = {"id": item.id, **settings(item, args), "audio": name, "sample_rate": audio.sample_rate,
                         "frames": int(audio.codes.shape[0]), "duration": audio.wav.shape[-1] / audio.sample_rate}
                manifest.write(json.dumps(entry, ensure_ascii=False) + "\n")  # only once the wav is in place
                manifest.flush()
                os.fsync(manifest.fileno())
                written += 1
            bar.update(len(chunk))
    return written


if __name__ == "__main__":
    sys.exit(main())
