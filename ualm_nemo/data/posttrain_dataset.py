r"""Map-style datasets over the post-training records (data/conversation.py): SFT conversations and DPO pairs.

* Heard audio (an ``audio`` part of a system / user turn) is read per item (``raw.load_audio``, 16 kHz mono)
  and becomes log-mel in the formatter.
* Written audio given as a wav (an ``audio`` part of an assistant turn) is codec-encoded ONCE when the dataset
  is built, batched, through ``dataset.encode_tta_codes`` (and its cache file): one clip, keyed by
  (path, start, end), is encoded once however many records or turns reference it. Written audio given as a
  ``codes`` file is loaded per item and used as it is.
* Records whose sample would be longer than ``seq_len`` positions are skipped before anything is encoded
  (lengths from the audio headers and the codes files' shapes, as data/length_limit.py does for the other
  tasks); each becomes a Reject in ``dataset.skipped`` (``file:line``, id, length) and the count and ids are
  logged.

``ConversationDataset[i]`` is ``formatter.format_conversation(turns, rng, learn)`` (task "conversation"; CFG
dropout drawn from ``random.Random`` seeded by (seed, epoch, index)). ``PreferenceDataset[i]`` is
``{"id", "chosen": Sample, "rejected": Sample}``, each side ``format_conversation(prompt + [("assistant",
side)], learn=[False] * len(prompt) + [True])`` with cfg_dropout 0 (DPO never drops the condition).

Where the clips come from is a ``ClipSource``: the files here (``FileClips``: heard audio read, written wavs
from their codec codes, codes files loaded; ``FileLengths``: lengths only), a Shar cut on the Shar path
(``cuts.CutClips``). ``format_conversation_record`` / ``format_preference_record`` are the one way a record
becomes a sample, for both paths.

Batches (``data/microbatch.MicroBatch``): ``collate_conversations`` is ``dataset.collate`` (it takes samples
with several heard clips (``formatting.sample_clips``): ``audio_features`` [N_audio, n_mel, F_max] holds every
clip batch-major, each sample's in placeholder order. ``collate_pairs`` is that over chosen, rejected, chosen,
rejected, ... (pair k at rows 2k and 2k + 1, what ``training/objectives.DPOObjective`` reads) with
``pair_ids`` set and no ``tasks``.
"""

from __future__ import annotations

import copy
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ualm_nemo.codec.xcodec import CodecTokenizer, num_codec_frames
from ualm_nemo.data.conversation import (AudioRef, CodesRef, ContentPart, ConversationRecord, ConversationTurn,
                                         PreferenceRecord, TextPart, load_codes_file, read_conversation_manifest,
                                         read_preference_manifest)
from ualm_nemo.data.dataset import collate, encode_tta_codes
from ualm_nemo.data.formatting import (AudioIn, AudioInLength, AudioOut, AudioOutLength, ChatTurn, Part, Sample,
                                       SampleFormatter)
from ualm_nemo.data.microbatch import MicroBatch
from ualm_nemo.data.raw import Reject, TTARecord, load_audio, num_samples_loaded
from ualm_nemo.model.vocab import UnifiedVocab

log = logging.getLogger(__name__)

ClipKey = tuple[str, float, "float | None"]  # AudioRef.key: (path, start, end)


# --------------------------------------------------------------------------------------------- written audio


def _assistant_parts(record: ConversationRecord | PreferenceRecord) -> Iterable[ContentPart]:
    turns = record.turns if isinstance(record, ConversationRecord) else record.prompt
    for turn in turns:
        if turn.role == "assistant":
            yield from turn.parts
    if isinstance(record, PreferenceRecord):
        yield from record.chosen
        yield from record.rejected


def written_clips(records: Sequence[ConversationRecord | PreferenceRecord]) -> list[AudioRef]:
    """Every distinct written wav clip (by ``AudioRef.key``), in order of first reference."""
    clips: dict[ClipKey, AudioRef] = {}
    for record in records:
        for part in _assistant_parts(record):
            if isinstance(part, AudioRef) and part.key not in clips:
                clips[part.key] = part
    return list(clips.values())


def encode_written_audio(records: Sequence[ConversationRecord | PreferenceRecord], codec: CodecTokenizer | None,
                         cache_path: str | Path | None = None) -> dict[ClipKey, torch.Tensor]:
    """Codec codes [F, 8] of each distinct written clip, encoded once (``dataset.encode_tta_codes``, its cache)."""
    clips = written_clips(records)
    if not clips:
        return {}
    if codec is None:
        raise ValueError(f"{len(clips)} written audio clips need a CodecTokenizer to compute their codec tokens")
    keys = [c.key for c in clips]
    as_segments = [TTARecord(Path(path), start, end, caption="") for path, start, end in keys]  # type: ignore[arg-type]
    return dict(zip(keys, encode_tta_codes(as_segments, codec, cache_path)))


# --------------------------------------------------------------------------------------------- turns


class ClipSource(Protocol):
    """Where a record's clips come from: the files (``FileClips``, ``FileLengths``) or a Shar cut
    (shar_dataset.py). Each method gets the record's reference and returns the formatter part."""

    def heard(self, ref: AudioRef) -> AudioIn | AudioInLength: ...

    def written(self, ref: AudioRef) -> AudioOut | AudioOutLength: ...

    def codes(self, ref: CodesRef) -> AudioOut | AudioOutLength: ...


@dataclass(frozen=True)
class FileClips:
    """Heard audio read from its file (``raw.load_audio``), written wavs from ``codes_by_key`` (codec codes per
    ``AudioRef.key``), codes files loaded as they are."""

    codes_by_key: Mapping[ClipKey, torch.Tensor]

    def heard(self, ref: AudioRef) -> AudioIn:
        _, start, end = ref.key
        return AudioIn(load_audio(ref.path, start, end))

    def written(self, ref: AudioRef) -> AudioOut:
        return AudioOut(self.codes_by_key[ref.key])

    def codes(self, ref: CodesRef) -> AudioOut:
        return AudioOut(torch.from_numpy(load_codes_file(ref.path)))


class FileLengths:
    """Clip lengths from the audio headers and the codes files' shapes (no audio read, no codec)."""

    def heard(self, ref: AudioRef) -> AudioInLength:
        _, start, end = ref.key
        return AudioInLength(num_samples_loaded(ref.path, start, end))

    def written(self, ref: AudioRef) -> AudioOutLength:
        _, start, end = ref.key
        return AudioOutLength(num_codec_frames(num_samples_loaded(ref.path, start, end)))

    def codes(self, ref: CodesRef) -> AudioOutLength:
        return AudioOutLength(int(np.load(ref.path, mmap_mode="r").shape[0]))


def _source(written: Mapping[ClipKey, torch.Tensor] | ClipSource | None) -> ClipSource:
    if written is None:
        return FileLengths()
    if isinstance(written, Mapping):
        return FileClips(written)
    return written


def _chat_parts(role: str, parts: Sequence[ContentPart], clips: ClipSource
                ) -> list[Part | AudioInLength | AudioOutLength]:
    """Record parts -> formatter parts: an audio part of an assistant turn is written, of any other turn heard."""
    out: list[Any] = []
    for part in parts:
        if isinstance(part, TextPart):
            out.append(part.text)
        elif isinstance(part, CodesRef):
            out.append(clips.codes(part))
        elif role == "assistant":
            out.append(clips.written(part))
        else:
            out.append(clips.heard(part))
    return out


def chat_turns(turns: Sequence[ConversationTurn], written: Mapping[ClipKey, torch.Tensor] | ClipSource | None
               ) -> list[ChatTurn]:
    """Record turns -> ``formatting.ChatTurn``s (heard audio loaded, written audio from ``written``: codes by
    clip key, or any ``ClipSource``); ``written=None``: the same turns with clip lengths in place of clips (for
    ``conversation_length``)."""
    clips = _source(written)
    return [(t.role, _chat_parts(t.role, t.parts, clips)) for t in turns]


def _preference_turns(record: PreferenceRecord, side: Sequence[ContentPart],
                      written: Mapping[ClipKey, torch.Tensor] | ClipSource | None
                      ) -> tuple[list[ChatTurn], list[bool]]:
    clips = _source(written)
    turns = chat_turns(record.prompt, clips) + [("assistant", _chat_parts("assistant", side, clips))]
    return turns, [False] * len(record.prompt) + [True]


def pair_formatter(formatter: SampleFormatter) -> SampleFormatter:
    """The formatter DPO pairs use: ``formatter`` with cfg_dropout 0 (DPO never drops the condition)."""
    if formatter.cfg_dropout == 0.0:
        return formatter
    formatter = copy.copy(formatter)  # shares tokenizer and log-mel; only the dropout differs
    formatter.cfg_dropout = 0.0
    return formatter


def format_conversation_record(formatter: SampleFormatter, record: ConversationRecord, clips: ClipSource,
                               rng: random.Random) -> Sample:
    """The SFT sample of a record (what ``ConversationDataset`` and the Shar loader both build)."""
    return formatter.format_conversation(chat_turns(record.turns, clips), rng, learn=[t.learn for t in record.turns])


def format_preference_record(formatter: SampleFormatter, record: PreferenceRecord, clips: ClipSource,
                             rng: random.Random) -> dict[str, Any]:
    """{"id", "chosen": Sample, "rejected": Sample} of a pair; ``formatter`` must have cfg_dropout 0
    (``pair_formatter``)."""
    if formatter.cfg_dropout != 0.0:
        raise ValueError("DPO pairs are formatted without CFG dropout: pass pair_formatter(formatter)")
    out: dict[str, Any] = {"id": record.id}
    for name, side in (("chosen", record.chosen), ("rejected", record.rejected)):
        turns, learn = _preference_turns(record, side, clips)
        out[name] = formatter.format_conversation(turns, rng, learn=learn)
    return out


# --------------------------------------------------------------------------------------------- length limit


def record_length(record: ConversationRecord | PreferenceRecord, formatter: SampleFormatter,
                  lengths: ClipSource | None = None) -> int:
    """Positions of the sample (the longer side of a pair) from clip lengths alone (default: the audio headers
    and codes shapes, ``FileLengths``)."""
    lengths = lengths or FileLengths()
    if isinstance(record, ConversationRecord):
        return formatter.conversation_length(chat_turns(record.turns, lengths))
    return max(formatter.conversation_length(_preference_turns(record, side, lengths)[0])
               for side in (record.chosen, record.rejected))


def drop_overlong(records: Sequence[Any], formatter: SampleFormatter, seq_len: int | None
                  ) -> tuple[list[Any], list[Reject]]:
    """(records whose samples fit ``seq_len`` positions, in order; a Reject naming each one that does not)."""
    if seq_len is None:
        return list(records), []
    kept, skipped, ids = [], [], []
    for record in records:
        n = record_length(record, formatter)
        if n <= seq_len:
            kept.append(record)
        else:
            ids.append(record.id)
            skipped.append(Reject(record.source or record.id, f"id {record.id!r}: sample of {n} positions is longer "
                                                              f"than data.seq_len={seq_len} (skipped)"))
    if skipped:
        log.warning("skipped %d of %d post-training samples longer than data.seq_len=%d: %s", len(skipped),
                    len(records), seq_len, ", ".join(ids[:20]) + (" ..." if len(ids) > 20 else ""))
    return kept, skipped


# --------------------------------------------------------------------------------------------- datasets


class _PostTrainDataset(Dataset):
    def __init__(self, records: Sequence[Any], formatter: SampleFormatter,
                 written: Mapping[ClipKey, torch.Tensor] | None = None, seed: int = 0,
                 skipped: Sequence[Reject] = ()):
        self.records = list(records)
        self.written = dict(written or {})
        missing = [c.key for c in written_clips(self.records) if c.key not in self.written]
        if missing:
            raise ValueError(f"written clips {missing[:3]} have no codec tokens (see encode_written_audio)")
        self.formatter = formatter
        self.seed = seed
        self.epoch = 0
        self.skipped = list(skipped)  # over-long records left out (Rejects naming file:line and id)

    @classmethod
    def from_records(cls, records: Sequence[Any], formatter: SampleFormatter, codec: CodecTokenizer | None = None,
                     *, seed: int = 0, cache_path: str | Path | None = None, seq_len: int | None = None):
        """Skip records longer than ``seq_len``, then encode the written wav clips once (``codec``, cache)."""
        kept, skipped = drop_overlong(records, formatter, seq_len)
        return cls(kept, formatter, encode_written_audio(kept, codec, cache_path), seed, skipped)

    def set_epoch(self, epoch: int) -> None:
        """New CFG dropout draws per epoch (like DistributedSampler.set_epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def _rng(self, index: int) -> random.Random:
        return random.Random(f"{self.seed}:{self.epoch}:{index}")  # str seeds hash deterministically


class ConversationDataset(_PostTrainDataset):
    """SFT: ``ConversationRecord``s -> conversation samples."""

    def __getitem__(self, index: int) -> Sample:
        return format_conversation_record(self.formatter, self.records[index], FileClips(self.written),
                                          self._rng(index))


class PreferenceDataset(_PostTrainDataset):
    """DPO: ``PreferenceRecord``s -> {"id", "chosen": Sample, "rejected": Sample} (the condition never dropped)."""

    def __init__(self, records: Sequence[PreferenceRecord], formatter: SampleFormatter,
                 written: Mapping[ClipKey, torch.Tensor] | None = None, seed: int = 0,
                 skipped: Sequence[Reject] = ()):
        super().__init__(records, pair_formatter(formatter), written, seed, skipped)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return format_preference_record(self.formatter, self.records[index], FileClips(self.written),
                                        self._rng(index))


def load_conversation_dataset(manifest: str | Path, formatter: SampleFormatter, codec: CodecTokenizer | None,
                              **kw: Any) -> tuple[ConversationDataset, list[Reject]]:
    """Read a conversation manifest and build its dataset -> (dataset, every reject: bad lines, then over-long
    records). ``kw``: seed, cache_path, seq_len."""
    result = read_conversation_manifest(manifest)
    ds = ConversationDataset.from_records(result.records, formatter, codec, **kw)
    return ds, result.rejects + ds.skipped


def load_preference_dataset(manifest: str | Path, formatter: SampleFormatter, codec: CodecTokenizer | None,
                            **kw: Any) -> tuple[PreferenceDataset, list[Reject]]:
    """Read a preference manifest and build its dataset -> (dataset, every reject). ``kw`` as above."""
    result = read_preference_manifest(manifest)
    ds = PreferenceDataset.from_records(result.records, formatter, codec, **kw)
    return ds, result.rejects + ds.skipped


# --------------------------------------------------------------------------------------------- batches


collate_conversations = collate  # one collate: dataset.collate takes any number of heard clips per sample


def collate_pairs(items: Sequence[Mapping[str, Any]], vocab: UnifiedVocab, pad_to_multiple: int = 8
                  ) -> MicroBatch:
    """``PreferenceDataset`` items -> one batch, rows chosen, rejected, chosen, rejected, ... (pair k at rows
    2k, 2k + 1; clips in that row order, each sample's in placeholder order) plus ``pair_ids``."""
    if not items:
        raise ValueError("cannot collate an empty batch")
    batch = collate_conversations([item[side] for item in items for side in ("chosen", "rejected")], vocab,
                                  pad_to_multiple)
    batch.pair_ids = [str(item["id"]) for item in items]
    batch.tasks = None  # DPO reads pairs, not tasks (there is no per-task figure for a pair)
    return batch


@dataclass(frozen=True)
class ConversationCollator:
    """Picklable ``collate_fn``: ``ConversationCollator(vocab)`` == ``partial(collate_conversations, vocab=vocab)``."""

    vocab: UnifiedVocab
    pad_to_multiple: int = 8

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> MicroBatch:
        return collate_conversations(samples, self.vocab, self.pad_to_multiple)


@dataclass(frozen=True)
class PairCollator:
    """Picklable ``collate_fn``: ``PairCollator(vocab)`` == ``partial(collate_pairs, vocab=vocab)``."""

    vocab: UnifiedVocab
    pad_to_multiple: int = 8

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> MicroBatch:
        return collate_pairs(items, self.vocab, self.pad_to_multiple)

