"""The sequence-length limit of the manifest (in-memory) training path: ``data.seq_len``, as on the Shar path.

A record's sample length is computed from its text and its audio's header alone (no codec, no log-mel), before
any audio is encoded, so a record far too long for the model (a 100k-character caption, an hour-long clip) is
skipped with its ``file:line`` and length instead of becoming one padded batch of that length (the collator
pads every row to the longest, and attention memory grows with its square).

Post-training records (conversations, preference pairs) have their own ``posttrain_dataset.record_length``
(clip lengths from headers and codes shapes; a pair: its longer side); ``record_length`` here hands them to it,
and the Shar loader uses it too (clip lengths from the cut's spans).
"""

from __future__ import annotations

import logging
from typing import Sequence

from ualm_nemo.codec.xcodec import num_codec_frames
from ualm_nemo.data.formatting import SampleFormatter
from ualm_nemo.data.raw import Record, Reject, TextRecord, TTARecord, UnderstandingRecord, num_samples_loaded

log = logging.getLogger(__name__)


def record_length(record: Record, formatter: SampleFormatter) -> int:
    """Positions of the sample ``formatter.format(record, ...)`` builds (CFG dropout keeps the length)."""
    if isinstance(record, TTARecord):
        samples = num_samples_loaded(record.audio_path, record.start, record.end)
        return formatter.tta_length(record.caption, num_codec_frames(samples))
    if isinstance(record, UnderstandingRecord):
        return formatter.understanding_length(record.turns, num_samples_loaded(record.audio_path))
    if isinstance(record, TextRecord):
        return formatter.text_length(record.turns)
    from ualm_nemo.data.conversation import ConversationRecord, PreferenceRecord

    if isinstance(record, (ConversationRecord, PreferenceRecord)):
        from ualm_nemo.data.posttrain_dataset import record_length as posttrain_length  # imports dataset.py

        return posttrain_length(record, formatter)
    raise TypeError(f"unknown record type {type(record).__name__}")


def drop_overlong(records: Sequence[Record], formatter: SampleFormatter, seq_len: int
                  ) -> tuple[list[Record], list[Reject]]:
    """(records that fit ``seq_len`` positions, in order; a Reject naming each one that does not)."""
    kept: list[Record] = []
    rejects: list[Reject] = []
    for record in records:
        n = record_length(record, formatter)
        if n <= seq_len:
            kept.append(record)
        else:
            rejects.append(Reject(record.source or type(record).__name__,
                                  f"sample of {n} positions is longer than data.seq_len={seq_len} (skipped)"))
    if rejects:
        log.warning("skipped %d of %d samples longer than data.seq_len=%d: %s", len(rejects), len(records),
                    seq_len, ", ".join(r.source for r in rejects[:20]) + (" ..." if len(rejects) > 20 else ""))
    return kept, rejects
