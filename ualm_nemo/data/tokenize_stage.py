"""Codec stage: prepared cuts (data/cuts.py) -> Lhotse Shar shards with 16 kHz audio and X-Codec tokens.

Shard ``k`` of a source is cuts ``[k * shard_size, (k + 1) * shard_size)`` of its prepared ``cuts.jsonl.gz``, so
shards are a pure function of the manifest and ``shard_size``: any set of processes can split them
(``select_shards``: interleaved by rank, or an explicit range, e.g. one Slurm array task each) and a re-run skips
every shard whose meta file exists (data/shar.py); the process that finds every shard done writes the source's
shard index (data/shard_index.py). The settings are recorded in the output and a rerun with
others is refused (stage_settings.py). Within a shard, clips are encoded in length-sorted batches
(``CodecTokenizer.encode``), which is deterministic: the same shard always gets the same codes.

Per cut: the audio is read once (segment, resample to 16 kHz, channel mean), encoded when its task is in
``codec_tasks`` (default: tta, the only task whose targets are codec tokens), and written as flac plus
``codec_tokens`` int16 [T, 8] (T = ``num_codec_frames(samples)``, lhotse's half-up rounding, so it survives the
Shar round trip). A cut whose audio fails to load, holds non-finite samples or fails to encode is written to the
shard's rejects file with the reason and the run goes on. Text sources go through the same stage and get cuts-only shards.

Conversation / preference cuts (data/cuts.py: one cut per record, its clips listed in ``clips``): each clip is
read with ``raw.load_audio`` (what the in-memory datasets read), the clips are concatenated into the cut's 16 kHz
recording, every written clip is encoded ON ITS OWN (in the shard's length-sorted batches; never the
concatenation, whose clip boundaries would bleed into each other's frames) and the codes files are loaded as they
are; ``codec_tokens`` is their concatenation in the order of the cut's frame spans (int16 [T, 8], a plain lhotse
Array: its frames do not follow the recording's time line). These tasks always encode
their written clips (``codec_tasks`` does not apply; a shard with written wav clips needs a codec). A clip that
fails to load, changed length since preparation, holds non-finite samples or fails to encode, or a broken codes
file, rejects the whole record.
"""

from __future__ import annotations

import gzip
import io
import itertools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import soundfile as sf
import torch
from lhotse import MonoCut, Recording
from lhotse.cut import Cut
from lhotse.serialization import decode_json_line, deserialize_item

from ualm_nemo.codec.xcodec import CodecTokenizer, num_codec_frames
from ualm_nemo.data.conversation import load_codes_file
from ualm_nemo.data.cuts import POSTTRAIN_TASKS, cut_task, cut_waveform
from ualm_nemo.data.raw import load_audio
from ualm_nemo.data.shar import CODEC_FIELD, FRAME_SHIFT, remove_leftovers, shard_done, write_shard
from ualm_nemo.data.shard_index import build_index, listing_fingerprint
from ualm_nemo.data.stage_settings import StageSettings, check_or_record
from ualm_nemo.model.audio_frames import SAMPLE_RATE

log = logging.getLogger(__name__)


def check_cuts_manifest(cuts_path: str | Path) -> None:
    """Refuse, in one line, a file that is not a prepared cuts manifest (gzipped Lhotse cuts): a raw jsonl given
    by mistake would otherwise fail deep inside gzip or Lhotse with a traceback. Reads the first line only."""
    hint = "expected a prepared cuts.jsonl.gz (Lhotse cuts written by examples/prepare_data.py)"
    try:
        with gzip.open(cuts_path, "rt", encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), None)
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise ValueError(f"{cuts_path}: {hint}; it is not gzip-compressed cuts ({err}; a raw manifest? run "
                         "examples/prepare_data.py on it first)") from None
    if first is None:
        raise ValueError(f"{cuts_path}: {hint}; it holds no cut")
    try:
        item = deserialize_item(decode_json_line(first))
    except Exception as err:  # Lhotse raises KeyError / ValueError / TypeError for a non-cut record
        raise ValueError(f"{cuts_path}: {hint}; its first line is not a Lhotse cut ({type(err).__name__}: "
                         f"{err}; a raw manifest? run examples/prepare_data.py on it first)") from None
    if not isinstance(item, Cut):
        raise ValueError(f"{cuts_path}: {hint}; its first line is a {type(item).__name__}, not a cut")


def count_cuts(cuts_path: str | Path) -> int:
    with gzip.open(cuts_path, "rt", encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def num_shards(num_cuts: int, shard_size: int) -> int:
    return -(-num_cuts // shard_size)


def select_shards(total: int, *, rank: int = 0, world: int = 1, shard_range: tuple[int, int] | None = None
                  ) -> list[int]:
    """This process's shards: ``range(*shard_range)`` if given, else every ``world``-th shard from ``rank``."""
    if shard_range is not None:
        start, stop = shard_range
        if not 0 <= start <= stop:
            raise ValueError(f"shard range {start}:{stop} is empty or negative")
        return list(range(start, min(stop, total)))
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside world size {world}")
    return list(range(rank, total, world))


def iter_shard_cuts(cuts_path: str | Path, shard_size: int, shards: Sequence[int]) -> Iterator[tuple[int, list[Cut]]]:
    """(shard, its cuts) for the wanted shards, in increasing order; only their manifest lines are parsed."""
    wanted = sorted(set(shards))
    with gzip.open(cuts_path, "rt", encoding="utf-8") as f:
        lines = (line for line in f if line.strip())
        position = 0
        for shard in wanted:
            skip = shard * shard_size - position
            chunk = list(itertools.islice(lines, skip, skip + shard_size))
            position = shard * shard_size + len(chunk)
            if not chunk:
                return
            yield shard, [deserialize_item(decode_json_line(line)) for line in chunk]


def _mono_in_memory(cut: Cut, wav: torch.Tensor) -> Cut:
    """The cut re-based on its decoded 16 kHz mono samples, so the Shar writer does not read the source again."""
    buf = io.BytesIO()
    sf.write(buf, wav.numpy(), SAMPLE_RATE, format="WAV", subtype="FLOAT")
    recording = Recording.from_bytes(buf.getvalue(), recording_id=cut.id)
    return MonoCut(id=cut.id, start=0.0, duration=recording.duration, channel=0, recording=recording,
                   custom=dict(cut.custom or {}))


@dataclass
class StageReport:
    shards_written: list[int] = field(default_factory=list)
    shards_skipped: list[int] = field(default_factory=list)
    num_cuts: int = 0
    num_rejects: int = 0
    audio_seconds: float = 0.0
    encode_seconds: float = 0.0  # wall time inside the codec
    wall_seconds: float = 0.0

    @property
    def realtime_factor(self) -> float:
        """Seconds of audio processed per wall-clock second (load + encode + write)."""
        return self.audio_seconds / self.wall_seconds if self.wall_seconds else 0.0


def tokenize_shard(cuts: Sequence[Cut], codec: CodecTokenizer | None, codec_tasks: Sequence[str]
                   ) -> tuple[list[Cut], list[dict], dict[str, str], float]:
    """Load, encode and attach: (cuts ready to write, rejects, Shar fields, seconds spent encoding)."""
    tasks = {cut_task(c) for c in cuts}
    if len(tasks) > 1:
        raise ValueError(f"a source holds one task, found {sorted(tasks)} (prepare one manifest per task)")
    task = tasks.pop() if tasks else "text"
    if task in POSTTRAIN_TASKS:
        return tokenize_posttrain_shard(cuts, codec)
    fields: dict[str, str] = {}
    if task != "text":
        fields["recording"] = "flac"
    encode = task in codec_tasks and task != "text"
    if encode:
        if codec is None:
            raise ValueError(f"{task} cuts need a codec (--codec) for their {CODEC_FIELD}")
        fields[CODEC_FIELD] = "numpy"
    out: list[Cut] = []
    rejects: list[dict] = []
    wavs: list[torch.Tensor] = []
    for cut in cuts:
        if task == "text":
            out.append(cut)
            continue
        try:
            wav = cut_waveform(cut)
            if wav.numel() == 0:
                raise ValueError("no samples")
        except Exception as e:  # a file changed or broke since preparation: record it, keep going
            rejects.append(_reject(cut, f"audio failed to load: {type(e).__name__}: {e}"))
            continue
        if not bool(torch.isfinite(wav).all()):  # the codec would turn them into all-zero codes, silently
            rejects.append(_reject(cut, "non-finite samples (NaN or inf) in the decoded audio"))
            continue
        out.append(_mono_in_memory(cut, wav))
        wavs.append(wav)
    seconds = 0.0
    if encode and out:
        t0 = time.perf_counter()
        codes = encode_or_explain(codec, wavs)
        seconds = time.perf_counter() - t0
        encoded = []
        for cut, c in zip(out, codes):
            if isinstance(c, str):
                rejects.append(_reject(cut, c))
            else:
                encoded.append(cut.attach_tensor(CODEC_FIELD, c.numpy().astype(np.int16), frame_shift=FRAME_SHIFT,
                                                 temporal_dim=0))
        out = encoded
    return out, rejects, fields, seconds


def _load_posttrain(cut: Cut) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(every clip's 16 kHz mono samples, every codes file's codes) of a conversation / preference cut, checked
    against the spans written at preparation; raises ValueError naming what is wrong."""
    wavs = []
    for k, clip in enumerate(cut.custom["clips"]):
        try:
            wav = load_audio(clip["path"], 0.0 if clip["start"] is None else clip["start"], clip["end"])
        except Exception as e:  # a file changed or broke since preparation
            raise ValueError(f"clip {k} ({clip['path']}) failed to load: {type(e).__name__}: {e}") from None
        a, b = clip["samples"]
        if wav.shape[0] != b - a:
            raise ValueError(f"clip {k} ({clip['path']}) has {wav.shape[0]} samples, {b - a} at preparation "
                             "(the file changed: prepare the source again)")
        if not bool(torch.isfinite(wav).all()):
            raise ValueError(f"clip {k} ({clip['path']}): non-finite samples (NaN or inf) in the decoded audio")
        wavs.append(wav)
    codes = []
    for k, entry in enumerate(cut.custom["codes"]):
        c = torch.from_numpy(load_codes_file(Path(entry["path"])))  # raises a ValueError naming the problem
        a, b = entry["frames"]
        if c.shape[0] != b - a:
            raise ValueError(f"codes file {entry['path']} holds {c.shape[0]} frames, {b - a} at preparation")
        codes.append(c)
    return wavs, codes


def tokenize_posttrain_shard(cuts: Sequence[Cut], codec: CodecTokenizer | None
                             ) -> tuple[list[Cut], list[dict], dict[str, str], float]:
    """``tokenize_shard`` for conversation / preference cuts (see the module docstring)."""
    loaded: list[tuple[Cut, list[torch.Tensor], list[torch.Tensor]]] = []
    rejects: list[dict] = []
    for cut in cuts:
        try:
            wavs, codes = _load_posttrain(cut)
        except ValueError as e:
            rejects.append(_reject(cut, str(e)))
            continue
        loaded.append((cut, wavs, codes))
    # every written clip of the shard, encoded separately (batched by length, like any other clips)
    todo = [(i, k) for i, (cut, _, _) in enumerate(loaded)
            for k, clip in enumerate(cut.custom["clips"]) if clip["frames"] is not None]
    seconds = 0.0
    encoded: dict[tuple[int, int], torch.Tensor | str] = {}
    if todo:
        if codec is None:
            raise ValueError(f"{len(todo)} written clips need a codec (--codec) for their {CODEC_FIELD}")
        t0 = time.perf_counter()
        encoded = dict(zip(todo, encode_or_explain(codec, [loaded[i][1][k] for i, k in todo])))
        seconds = time.perf_counter() - t0
    out = []
    for i, (cut, wavs, codes) in enumerate(loaded):
        pieces: list[tuple[int, torch.Tensor]] = [(entry["frames"][0], c) for entry, c in
                                                  zip(cut.custom["codes"], codes)]
        failed = None
        for k, clip in enumerate(cut.custom["clips"]):
            if clip["frames"] is None:
                continue
            c = encoded[(i, k)]
            if isinstance(c, str):
                failed = f"written clip {k} ({clip['path']}): {c}"
                break
            pieces.append((clip["frames"][0], c))
        if failed:
            rejects.append(_reject(cut, failed))
            continue
        ready = _mono_in_memory(cut, torch.cat(wavs)) if wavs else cut
        if pieces:
            tokens = torch.cat([c for _, c in sorted(pieces, key=lambda p: p[0])])  # in the cut's frame order
            # a plain Array, not a TemporalArray: lhotse slices those by the cut's duration, and these frames
            # (written clips and codes files) do not follow the recording's time line
            ready = ready.attach_tensor(CODEC_FIELD, tokens.numpy().astype(np.int16))
        out.append(ready)
    return out, rejects, {"recording": "flac", CODEC_FIELD: "numpy"}, seconds


def _reject(cut: Cut, reason: str) -> dict:
    return {"cut_id": cut.id, "origin": (cut.custom or {}).get("origin"), "reason": reason}


def encode_or_explain(codec: CodecTokenizer, wavs: Sequence[torch.Tensor]) -> list[torch.Tensor | str]:
    """Codes [T, N] per clip, or the reason it could not be encoded: one bad clip must not abort its shard.

    The clips are encoded together; if that fails, one at a time, so only the failing ones are rejected. Codes of
    the wrong shape or outside the codebook are rejected too (they would fail much later, in training).
    """
    try:
        codes: list = list(codec.encode(wavs))
    except Exception as batch_error:  # any codec failure (out of memory, a kernel error): find the clip
        log.warning("codec failed on a batch of %d clips (%s): encoding them one at a time", len(wavs), batch_error)
        codes = []
        for wav in wavs:
            try:
                codes.append(codec.encode([wav])[0])
            except Exception as e:
                codes.append(f"codec failed to encode the clip: {type(e).__name__}: {e}")
    checked: list[torch.Tensor | str] = []
    for wav, c in zip(wavs, codes):
        want = (num_codec_frames(wav.shape[0]), codec.num_codebooks)
        if isinstance(c, str):
            checked.append(c)
        elif tuple(c.shape) != want:
            checked.append(f"codec returned codes of shape {tuple(c.shape)}, expected {want}")
        elif c.numel() and (int(c.min()) < 0 or int(c.max()) >= codec.codebook_size):
            checked.append(f"codec returned codes outside [0, {codec.codebook_size})")
        else:
            checked.append(c)
    return checked


def tokenize_source(cuts_path: str | Path, out_dir: str | Path, codec: CodecTokenizer | None, *,
                    shard_size: int = 1000, shards: Sequence[int] | None = None,
                    codec_tasks: Sequence[str] = ("tta",), progress: bool = True,
                    codec_name: str | None = None) -> StageReport:
    """Write the selected shards (default: all) of one prepared source under ``out_dir``; skip finished ones.

    The settings are recorded in ``out_dir`` (stage_settings.py): a rerun with others raises StageSettingsError
    before any shard is touched. What killed runs left of this process's shards is removed first.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size} must be at least 1")
    num_cuts = count_cuts(cuts_path)
    check_or_record(out_dir, StageSettings(shard_size=shard_size, num_cuts=num_cuts,
                                           codec_tasks=tuple(codec_tasks), codec=codec_name))
    total = num_shards(num_cuts, shard_size)
    shards = list(range(total)) if shards is None else [s for s in shards if s < total]
    if removed := remove_leftovers(out_dir, shards):
        log.info("removed %d temporary files of killed runs under %s", removed, out_dir)
    report = StageReport(shards_skipped=[s for s in shards if shard_done(out_dir, s)])
    todo = [s for s in shards if s not in set(report.shards_skipped)]
    t_start = time.perf_counter()
    from tqdm import tqdm  # progress bar on a terminal, one summary line per shard in logs

    bar = tqdm(total=len(todo), unit="shard", disable=not progress, desc=Path(out_dir).name)
    for shard, cuts in iter_shard_cuts(cuts_path, shard_size, todo):
        ready, rejects, fields, enc_s = tokenize_shard(cuts, codec, codec_tasks)
        meta = write_shard(ready, out_dir, shard, fields, rejects)
        report.shards_written.append(shard)
        report.num_cuts += meta["num_cuts"]
        report.num_rejects += meta["num_rejects"]
        report.audio_seconds += meta["audio_seconds"]
        report.encode_seconds += enc_s
        report.wall_seconds = time.perf_counter() - t_start
        bar.update(1)
        bar.set_postfix(cuts=report.num_cuts, rejects=report.num_rejects, rtf=f"{report.realtime_factor:.0f}x")
        log.info("shard %06d: %d cuts, %d rejects, %.1f s audio (%d/%d done, %.0fx realtime)", shard,
                 meta["num_cuts"], meta["num_rejects"], meta["audio_seconds"], len(report.shards_written),
                 len(todo), report.realtime_factor)
    bar.close()
    write_index_when_complete(out_dir, total)
    report.wall_seconds = time.perf_counter() - t_start
    return report


def write_index_when_complete(out_dir: str | Path, total: int) -> bool:
    """Write the source's shard index (shard_index.py) once all ``total`` shards are done; True if written.

    Only the process that finds the source complete builds it (reading every meta file once): with many array
    tasks that is the last one, not each of them. An index missing after all is built on first use."""
    if total == 0 or listing_fingerprint(out_dir)["meta_files"] != total:
        return False
    build_index(out_dir)
    return True


def pick_device(device: str | None = None) -> torch.device:
    """``device`` if given, else CUDA when present, else CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
