"""Hand-built model batches that follow the data contract (ualm_nemo/data/formatting.py) without the loader."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ualm_nemo.data.dataset import collate
from ualm_nemo.data.microbatch import MicroBatch
from ualm_nemo.model.audio_frames import num_encoder_frames_from_mel
from ualm_nemo.model.delay_pattern import apply_delay
from ualm_nemo.model.vocab import IGNORE_INDEX, UnifiedVocab


def random_sample(vocab: UnifiedVocab, text_len: int, audio_frames: int, generator: torch.Generator,
                  text_weight: float = 1.0, audio_weight: float = 0.125) -> dict[str, Any]:
    """A text prompt then a delayed audio grid; every target after the prompt's first half carries loss."""
    text = torch.randint(0, vocab.text_vocab_size, (text_len,), generator=generator)
    rows = [vocab.text_position_streams(int(t)) for t in text]
    rows.append(vocab.text_position_streams(vocab.audio_start_id))
    codes = torch.randint(0, vocab.codebook_size, (audio_frames, vocab.num_codebooks), generator=generator)
    grid = vocab.codes_to_ids(apply_delay(codes, vocab.codebook_size))
    tokens = torch.cat([torch.tensor(rows), grid, torch.tensor([vocab.text_position_streams(vocab.audio_end_id)])])
    length = tokens.shape[0]
    labels = torch.full_like(tokens, IGNORE_INDEX)
    weights = torch.zeros(tokens.shape, dtype=torch.float32)
    labels[:-1] = tokens[1:]
    is_audio_target = torch.zeros(length, dtype=torch.bool)
    is_audio_target[text_len:text_len + grid.shape[0]] = True  # positions whose next token is an audio frame
    weights[is_audio_target] = audio_weight
    weights[~is_audio_target, 0] = text_weight
    labels[~is_audio_target, 1:] = IGNORE_INDEX
    no_loss = torch.arange(length) < text_len // 2
    no_loss[-1] = True
    labels[no_loss] = IGNORE_INDEX
    weights[no_loss] = 0.0
    return {"tokens": tokens, "labels": labels, "loss_weights": weights, "task": "tta"}


def random_understanding_sample(vocab: UnifiedVocab, mel_frames: int, answer_len: int, generator: torch.Generator,
                                n_mels: int = 128) -> dict[str, Any]:
    """A placeholder run for one clip (random log-mel), then a text answer that carries the loss."""
    placeholders = num_encoder_frames_from_mel(mel_frames)
    answer = torch.randint(0, vocab.text_vocab_size, (answer_len,), generator=generator)
    rows = [vocab.text_position_streams(vocab.audio_in_id)] * placeholders + \
        [vocab.text_position_streams(int(t)) for t in answer]
    tokens = torch.tensor(rows)
    labels = torch.full_like(tokens, IGNORE_INDEX)
    weights = torch.zeros(tokens.shape)
    answer_targets = torch.arange(placeholders - 1, tokens.shape[0] - 1)  # positions predicting the answer
    labels[answer_targets, 0] = tokens[answer_targets + 1, 0]
    weights[answer_targets, 0] = 1.0
    return {"tokens": tokens, "labels": labels, "loss_weights": weights, "task": "understanding",
            "audio_features": torch.randn(n_mels, mel_frames, generator=generator)}


def random_batch(vocab: UnifiedVocab, batch_size: int, seed: int, max_text: int = 12,
                 max_frames: int = 10, with_audio_input: bool = False, pad_to_multiple: int = 8) -> MicroBatch:
    """``random_sample``s of varied lengths (every other one an understanding sample with ``with_audio_input``)
    collated by ``data/dataset.collate``, as the training loader does."""
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(batch_size):
        if with_audio_input and i % 2 == 0:
            samples.append(random_understanding_sample(vocab, int(torch.randint(20, 60, (1,), generator=gen)),
                                                       int(torch.randint(2, max_text, (1,), generator=gen)), gen))
        else:
            samples.append(random_sample(vocab, int(torch.randint(2, max_text, (1,), generator=gen)),
                                         int(torch.randint(1, max_frames, (1,), generator=gen)), gen))
    return collate(samples, vocab, pad_to_multiple)


def same_batch(a: MicroBatch, b: MicroBatch) -> bool:
    """Every field equal: tensors element for element (and both None or neither), the rest by ``==``."""
    for f in dataclasses.fields(MicroBatch):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if torch.is_tensor(x) or torch.is_tensor(y):
            if (x is None) != (y is None) or (x is not None and not torch.equal(x, y)):
                return False
        elif x != y:
            return False
    return True
