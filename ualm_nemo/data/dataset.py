"""Map-style dataset over raw records, and the batch collator (the demo/foundation data path; Shar comes later).

Codec tokens of TTA records are computed once, batched, when the dataset is built (and optionally cached to a
file); understanding audio is read and turned into log-mel per item. CFG dropout draws from a
``random.Random`` seeded by (seed, epoch, index), so an item is the same whichever worker builds it.

Batch (``collate``): a ``microbatch.MicroBatch`` (every field and shape documented there), one sample per row,
right-padded by ``batching.pad_rows`` to the longest row rounded up to ``pad_to_multiple``; each sample's heard
clips (it may hold several) in placeholder order, row-major. No ``position_ids`` / ``segment_ids``: a row holds
one sample, so positions are 0..S-1 and attention plain causal.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch.utils.data import Dataset

from ualm_nemo.codec.xcodec import CodecTokenizer
from ualm_nemo.data.batching import pad_rows
from ualm_nemo.data.formatting import Sample, SampleFormatter, sample_clips
from ualm_nemo.data.microbatch import MicroBatch
from ualm_nemo.data.raw import (Record, Reject, TTARecord, UnderstandingRecord, load_audio, read_text_manifest,
                                read_tta_manifest, read_understanding_manifest)
from ualm_nemo.data.tokenizer import TextTokenizer
from ualm_nemo.model.audio_frames import num_encoder_frames_from_mel
from ualm_nemo.model.vocab import UnifiedVocab

log = logging.getLogger(__name__)


def encode_tta_codes(records: Sequence[TTARecord], codec: CodecTokenizer, cache_path: str | Path | None = None,
                     chunk: int = 256) -> list[torch.Tensor]:
    """Codec tokens [F, 8] per record (input order); reuses ``cache_path`` if it was written for these records
    with this codec (``CodecTokenizer.fingerprint``), else encodes and rewrites it."""
    keys = [(str(r.audio_path), r.start, r.end) for r in records]
    fingerprint = codec.fingerprint() if cache_path is not None else None
    if cache_path is not None and Path(cache_path).is_file():
        cached = torch.load(cache_path, weights_only=True)
        if cached.get("keys") == keys and cached.get("codec") == fingerprint:
            log.info("codec tokens of %d clips read from %s", len(keys), cache_path)
            return [c.long() for c in cached["codes"]]
        log.info("%s was written for other clips or another codec: encoding again", cache_path)
    codes: list[torch.Tensor] = []
    for k in range(0, len(records), chunk):  # bounded memory: only ``chunk`` waveforms loaded at a time
        codes += codec.encode([load_audio(r.audio_path, r.start, r.end) for r in records[k:k + chunk]])
    if cache_path is not None:
        Path(cache_path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(f"{cache_path}.tmp-{os.getpid()}")  # renamed when complete: a killed job leaves no torn cache
        torch.save({"keys": keys, "codec": fingerprint, "codes": [c.to(torch.int16) for c in codes]}, tmp)
        os.replace(tmp, cache_path)  # int16: codes < 1024 < 2**15
    return codes


class UALMDataset(Dataset):
    """Records -> formatted samples. ``codes[i]`` is the codec tokens of ``records[i]`` when it is a TTA record."""

    def __init__(self, records: Sequence[Record], formatter: SampleFormatter,
                 codes: Sequence[torch.Tensor | None] | None = None, seed: int = 0):
        self.records = list(records)
        self.codes = list(codes) if codes is not None else [None] * len(self.records)
        if len(self.codes) != len(self.records):
            raise ValueError(f"{len(self.codes)} code tensors for {len(self.records)} records")
        missing = [i for i, r in enumerate(self.records) if isinstance(r, TTARecord) and self.codes[i] is None]
        if missing:
            raise ValueError(f"TTA records {missing[:5]} have no codec tokens (see encode_tta_codes)")
        self.formatter = formatter
        self.seed = seed
        self.epoch = 0

    @classmethod
    def from_records(cls, records: Sequence[Record], formatter: SampleFormatter, codec: CodecTokenizer | None,
                     seed: int = 0, cache_path: str | Path | None = None) -> "UALMDataset":
        """Encodes the TTA records' audio once with ``codec`` (needed only if there are TTA records)."""
        tta_idx = [i for i, r in enumerate(records) if isinstance(r, TTARecord)]
        codes: list[torch.Tensor | None] = [None] * len(records)
        if tta_idx:
            if codec is None:
                raise ValueError("TTA records need a CodecTokenizer to compute their codec tokens")
            for i, c in zip(tta_idx, encode_tta_codes([records[i] for i in tta_idx], codec, cache_path)):
                codes[i] = c
        return cls(records, formatter, codes, seed)

    def set_epoch(self, epoch: int) -> None:
        """New CFG dropout draws per epoch; call from the training loop (like DistributedSampler.set_epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        record = self.records[index]
        rng = random.Random(f"{self.seed}:{self.epoch}:{index}")  # str seeds hash deterministically (sha512)
        waveform = load_audio(record.audio_path) if isinstance(record, UnderstandingRecord) else None
        return self.formatter.format(record, rng, codes=self.codes[index], waveform=waveform)


@dataclass(frozen=True)
class Collator:
    """Picklable ``collate_fn`` for a DataLoader: ``Collator(vocab)`` == ``partial(collate, vocab=vocab)``."""

    vocab: UnifiedVocab
    pad_to_multiple: int = 8

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> MicroBatch:
        return collate(samples, self.vocab, self.pad_to_multiple)


def collate(samples: Sequence[Mapping[str, Any]], vocab: UnifiedVocab, pad_to_multiple: int = 8) -> MicroBatch:
    """Right-pad samples into a batch, one sample per row (module docstring)."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    for i, s in enumerate(samples):
        # the model writes one encoder frame per placeholder: a mismatch would be a silent misalignment there
        own = sample_clips(s)
        placeholders = int((s["tokens"][:, 0] == vocab.audio_in_id).sum())
        frames = sum(num_encoder_frames_from_mel(int(c.shape[1])) for c in own)
        if placeholders != frames:
            raise ValueError(f"sample {i} has {placeholders} <|audio_in|> positions but its {len(own)} clip(s) give "
                             f"{frames} frames")
    longest = max(s["tokens"].shape[0] for s in samples)
    batch = pad_rows([[s] for s in samples], vocab, -(-longest // pad_to_multiple) * pad_to_multiple)
    # one sample per row: the model's default positions and plain causal attention (no block mask)
    return dataclasses.replace(batch, position_ids=None, segment_ids=None)


def build_demo_dataset(manifests: Mapping[str, str | Path], tokenizer: TextTokenizer, codec: CodecTokenizer | None,
                       vocab: UnifiedVocab, seed: int = 0, cache_path: str | Path | None = None,
                       seq_len: int | None = None, **formatter_kw: Any) -> tuple[UALMDataset, list[Reject]]:
    """Read the manifests ({"tta"|"understanding"|"text": path}, any subset), encode, and wrap them.

    Records keep manifest order, tasks in the order tta, understanding, text; a sampler does the shuffling.
    Records whose sample would be longer than ``seq_len`` positions are rejected before any audio is encoded.
    Returns the dataset and every rejected entry (log them: nothing is dropped silently).
    """
    unknown = set(manifests) - {"tta", "understanding", "text"}
    if unknown:
        raise ValueError(f"unknown manifest kinds {sorted(unknown)}; expected tta / understanding / text")
    readers = {"tta": read_tta_manifest, "understanding": read_understanding_manifest, "text": read_text_manifest}
    records: list[Record] = []
    rejects: list[Reject] = []
    for kind in ("tta", "understanding", "text"):
        if kind in manifests:
            result = readers[kind](manifests[kind])
            records += result.records
            rejects += result.rejects
    formatter = SampleFormatter(tokenizer, vocab, **formatter_kw)
    if seq_len is not None:
        from ualm_nemo.data.length_limit import drop_overlong

        records, overlong = drop_overlong(records, formatter, seq_len)
        rejects += overlong
    return UALMDataset.from_records(records, formatter, codec, seed, cache_path), rejects
