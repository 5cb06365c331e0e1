"""format_conversation, row by row: a multi-audio conversation against a hand-written table, its prompt rows,
CFG condition dropout, and the one-turn text-to-audio conversation == format_tta."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import random

import pytest
import torch

torch.set_num_threads(1)

from ualm_nemo.data.formatting import (AudioIn, AudioInLength, AudioOut, AudioOutLength, LogMel, SampleFormatter,
                                       sample_clips)
from ualm_nemo.data.tokenizer import ByteChatTokenizer
from ualm_nemo.model.vocab import IGNORE_INDEX as X
from ualm_nemo.model.vocab import UnifiedVocab

V = UnifiedVocab(text_vocab_size=384)
TOK = ByteChatTokenizer()
IM_START, IM_END, NL = 257, 258, ord("\n")
P = 1024  # delay pad, as a code value
A = 0.125  # audio_stream_weight


def _fmt(**kw) -> SampleFormatter:
    return SampleFormatter(TOK, V, **kw)


def T(i: int) -> list[int]:
    """A text position: id on stream 0, codebook pads on 1..7."""
    return [i] + [V.audio_pad_id(n) for n in range(1, 8)]


def G(codes: list[int]) -> list[int]:
    """A delayed-grid row given as code values (P = pad) -> unified ids."""
    return [V.audio_offset + n * 1025 + c for n, c in enumerate(codes)]


IGN, W0 = [X] * 8, [0.0] * 8
WT = [1.0] + [0.0] * 7  # a learned text target
WA = [A] * 8  # a learned grid target


def L(i: int) -> list[int]:
    """Label of a learned text target: the id on stream 0, IGNORE on 1..7."""
    return [i] + [X] * 7


# two codec frames, codebook n of frame f = 10 f + n
CODES = torch.tensor([[10 * f + n for n in range(8)] for f in range(2)])
GRID = [  # apply_delay(CODES), written by hand
    [0, P, P, P, P, P, P, P],
    [10, 1, P, P, P, P, P, P],
    [P, 11, 2, P, P, P, P, P],
    [P, P, 12, 3, P, P, P, P],
    [P, P, P, 13, 4, P, P, P],
    [P, P, P, P, 14, 5, P, P],
    [P, P, P, P, P, 15, 6, P],
    [P, P, P, P, P, P, 16, 7],
    [P, P, P, P, P, P, P, 17],
]
# 1280 samples at 16 kHz = 8 log-mel frames = 2 encoder frames (two <|audio_in|> positions)
WAV_A = torch.sin(torch.arange(1280) * 0.05) * 0.3
WAV_B = torch.sin(torch.arange(1280) * 0.11) * 0.2  # the clip the assistant wrote, heard back
TURNS = [
    ("user", [AudioIn(WAV_A), "hi"]),
    ("assistant", ["ok", AudioOut(CODES)]),
    ("user", [AudioIn(WAV_B), "?"]),
    ("assistant", "no"),
]
AS, AE, AI = V.audio_start_id, V.audio_end_id, V.audio_in_id

# (tokens, labels, loss_weights) of every row, by hand
TABLE = [
    # turn 0, user: <|im_start|>user\n <|audio_in|> x2 hi <|im_end|>\n -- nothing learned
    (T(IM_START), IGN, W0), (T(ord("u")), IGN, W0), (T(ord("s")), IGN, W0), (T(ord("e")), IGN, W0),
    (T(ord("r")), IGN, W0), (T(NL), IGN, W0),
    (T(AI), IGN, W0), (T(AI), IGN, W0),
    (T(ord("h")), IGN, W0), (T(ord("i")), IGN, W0), (T(IM_END), IGN, W0), (T(NL), IGN, W0),
    # turn 1, assistant (learned): header, "ok", <|audio_start|> grid <|audio_end|>, <|im_end|>
    (T(IM_START), IGN, W0),
    *[(T(c), IGN, W0) for c in b"assistant"],
    (T(NL), L(ord("o")), WT),  # row 22
    (T(ord("o")), L(ord("k")), WT),
    (T(ord("k")), L(AS), WT),  # the model picks audio
    (T(AS), G(GRID[0]), WA),  # row 25
    (G(GRID[0]), G(GRID[1]), WA), (G(GRID[1]), G(GRID[2]), WA), (G(GRID[2]), G(GRID[3]), WA),
    (G(GRID[3]), G(GRID[4]), WA), (G(GRID[4]), G(GRID[5]), WA), (G(GRID[5]), G(GRID[6]), WA),
    (G(GRID[6]), G(GRID[7]), WA), (G(GRID[7]), G(GRID[8]), WA),
    (G(GRID[8]), L(AE), WT),
    (T(AE), L(IM_END), WT),  # row 35
    (T(IM_END), IGN, W0), (T(NL), IGN, W0),
    # turn 2, user: the written clip heard back, "?"
    (T(IM_START), IGN, W0), (T(ord("u")), IGN, W0), (T(ord("s")), IGN, W0), (T(ord("e")), IGN, W0),
    (T(ord("r")), IGN, W0), (T(NL), IGN, W0),
    (T(AI), IGN, W0), (T(AI), IGN, W0),
    (T(ord("?")), IGN, W0), (T(IM_END), IGN, W0), (T(NL), IGN, W0),
    # turn 3, assistant (learned): "no"
    (T(IM_START), IGN, W0),
    *[(T(c), IGN, W0) for c in b"assistant"],
    (T(NL), L(ord("n")), WT),
    (T(ord("n")), L(ord("o")), WT),
    (T(ord("o")), L(IM_END), WT),
    (T(IM_END), IGN, W0),
    (T(NL), IGN, W0),  # the last row has no target
]


def test_multi_audio_conversation_every_row():
    s = _fmt(cfg_dropout=0.0).format_conversation(TURNS, random.Random(0))
    assert len(TABLE) == 64 and s["task"] == "conversation"
    assert s["tokens"].tolist() == [r[0] for r in TABLE]
    assert s["labels"].tolist() == [r[1] for r in TABLE]
    assert s["loss_weights"].tolist() == [r[2] for r in TABLE]
    mel = LogMel(128)
    clips = sample_clips(s)
    assert isinstance(s["audio_features"], list) and len(clips) == 2  # both heard clips, in placeholder order
    assert torch.equal(clips[0], mel(WAV_A)) and torch.equal(clips[1], mel(WAV_B))
    assert clips[0].shape == (128, 8)


def test_prompt_rows_are_the_training_rows():
    fmt = _fmt(cfg_dropout=0.0)
    s = fmt.format_conversation(TURNS, random.Random(0))
    prompt, features = fmt.conversation_prompt(TURNS[:3])
    assert prompt.shape == (38 + 11 + 11, 8)  # through turn 3's <|im_start|>assistant\n
    assert torch.equal(prompt, s["tokens"][: prompt.shape[0]])
    assert len(features) == 2 and all(torch.equal(a, b) for a, b in zip(features, sample_clips(s)))
    # with a system prompt too: one layout
    fmt = _fmt(cfg_dropout=0.0, system_prompt="be brief")
    s = fmt.format_conversation(TURNS, random.Random(0))
    prompt, _ = fmt.conversation_prompt(TURNS[:1])
    assert torch.equal(prompt, s["tokens"][: prompt.shape[0]])


def test_conversation_length_without_audio():
    fmt = _fmt()
    sized = [("user", [AudioInLength(1280), "hi"]), ("assistant", ["ok", AudioOutLength(2)]),
             ("user", [AudioInLength(1280), "?"]), ("assistant", "no")]
    assert fmt.conversation_length(sized) == fmt.conversation_length(TURNS) == len(TABLE)


def test_learn_flags():
    fmt = _fmt(cfg_dropout=0.0)
    s = fmt.format_conversation(TURNS, random.Random(0), learn=[False, False, False, True])
    learned_rows = (s["loss_weights"] > 0).any(dim=1).nonzero().flatten().tolist()
    assert learned_rows == [59, 60, 61]  # rows predicting turn 3's "no" and <|im_end|>
    assert torch.equal(s["tokens"], fmt.format_conversation(TURNS, random.Random(0))["tokens"])
    with pytest.raises(ValueError, match="only assistant turns"):
        fmt.format_conversation(TURNS, random.Random(0), learn=[True, True, False, True])
    with pytest.raises(ValueError, match="learned assistant turn"):
        fmt.format_conversation(TURNS, random.Random(0), learn=[False] * 4)
    with pytest.raises(ValueError, match="learn flags"):
        fmt.format_conversation(TURNS, random.Random(0), learn=[True])
    with pytest.raises(ValueError, match="cannot hold AudioOut"):
        fmt.format_conversation([("user", [AudioOut(CODES)]), ("assistant", "x")], random.Random(0))
    with pytest.raises(ValueError, match="codes must lie"):
        fmt.format_conversation([("user", "x"), ("assistant", [AudioOut(CODES + 1020)])], random.Random(0))


def test_cfg_dropout_of_a_conversation():
    kept = _fmt(cfg_dropout=0.0).format_conversation(TURNS, random.Random(0))
    s = _fmt(cfg_dropout=1.0).format_conversation(TURNS, random.Random(0))
    pad = T(V.pad_id)
    tokens = s["tokens"].tolist()
    # before turn 1's <|audio_start|> (row 25), and every later turn: pad rows
    assert tokens[:25] == [pad] * 25 and tokens[38:] == [pad] * 26
    # the audio segment, then the rest of turn 1 (<|im_end|>, \n): as written
    assert torch.equal(s["tokens"][25:38], kept["tokens"][25:38])
    labels = s["labels"].tolist()
    weights = s["loss_weights"].tolist()
    assert labels[:24] == [IGN] * 24 and weights[:24] == [W0] * 24  # "ok" is not learned any more
    assert labels[24] == L(AS) and weights[24] == WT  # the row before <|audio_start|> still predicts it
    assert torch.equal(s["labels"][25:36], kept["labels"][25:36])  # grid and <|audio_end|> -> <|im_end|>
    assert labels[36:] == [IGN] * 28 and weights[36:] == [W0] * 28
    assert s["audio_features"] is None  # the heard clips' placeholders are pads: their features leave too
    assert s["tokens"].shape == kept["tokens"].shape


def test_cfg_dropout_drawn_once_and_only_when_audio_is_written():
    fmt = _fmt(cfg_dropout=0.5)
    rng = random.Random(1)
    text_only = [("user", "hi"), ("assistant", "no")]
    fmt.format_conversation(text_only, rng)
    assert rng.getstate() == random.Random(1).getstate()  # no draw without written audio
    ref = random.Random(1)
    ref.random()
    fmt.format_conversation(TURNS, rng)
    assert rng.getstate() == ref.getstate()  # one draw
    # a written turn that is not learned does not draw either
    rng = random.Random(1)
    fmt.format_conversation(TURNS, rng, learn=[False, False, False, True])
    assert rng.getstate() == random.Random(1).getstate()


def test_dropout_uses_the_last_learned_turn_that_writes_audio():
    codes_b = CODES.flip(0)
    turns = [("user", "a"), ("assistant", [AudioOut(CODES)]), ("user", "b"),
             ("assistant", ["c", AudioOut(codes_b), "d"])]
    fmt = _fmt(cfg_dropout=1.0)
    s = fmt.format_conversation(turns, random.Random(0))
    kept = _fmt(cfg_dropout=0.0).format_conversation(turns, random.Random(0))
    starts = (kept["tokens"][:, 0] == AS).nonzero().flatten().tolist()
    assert len(starts) == 2
    second = starts[1]
    assert bool((s["tokens"][:second, 0] == V.pad_id).all())  # the first turn's audio is padded too
    assert torch.equal(s["tokens"][second:], kept["tokens"][second:])  # segment, then "d" <|im_end|> \n
    assert torch.equal(s["labels"][second - 1:], kept["labels"][second - 1:])
    assert bool((s["labels"][: second - 1] == X).all())


@pytest.mark.parametrize("dropout,seed", [(0.0, 0), (1.0, 0), (0.5, 3), (0.5, 4)])
@pytest.mark.parametrize("system", [None, "sys"])
def test_one_turn_tta_conversation_is_format_tta(dropout, seed, system):
    fmt = _fmt(cfg_dropout=dropout, system_prompt=system)
    codes = torch.tensor([[100 * f + n for n in range(8)] for f in range(3)])
    tta = fmt.format_tta("hum", codes, random.Random(seed))
    conv = fmt.format_conversation([("user", "hum"), ("assistant", [AudioOut(codes)])], random.Random(seed))
    for key in ("tokens", "labels", "loss_weights"):
        assert torch.equal(tta[key], conv[key]), key
    assert conv["audio_features"] is None
    assert fmt.conversation_length([("user", "hum"), ("assistant", [AudioOutLength(3)])]) == fmt.tta_length("hum", 3)


def test_one_heard_clip_is_a_plain_tensor():
    s = _fmt().format_conversation([("user", [AudioIn(WAV_A), "what?"]), ("assistant", "a dog")], random.Random(0))
    assert isinstance(s["audio_features"], torch.Tensor) and s["audio_features"].shape == (128, 8)
    assert sample_clips(s)[0] is s["audio_features"] and sample_clips({"audio_features": None}) == []
