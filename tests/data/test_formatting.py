"""The sample contract, row by row: tokens / labels / loss_weights for each task, CFG dropout, prompts."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import random

import pytest
import torch

from ualm_nemo.data.formatting import LogMel, SampleFormatter
from ualm_nemo.data.raw import TextRecord, TTARecord, UnderstandingRecord
from ualm_nemo.data.tokenizer import ByteChatTokenizer
from ualm_nemo.model.audio_frames import num_encoder_frames, num_mel_frames
from ualm_nemo.model.vocab import IGNORE_INDEX as X
from ualm_nemo.model.vocab import UnifiedVocab

V = UnifiedVocab(text_vocab_size=384)
TOK = ByteChatTokenizer()
IM_START, IM_END, NL = 257, 258, ord("\n")
P = 1024  # delay pad, as a code value


def _fmt(**kw) -> SampleFormatter:
    return SampleFormatter(TOK, V, **kw)


def _text_row(i: int) -> list[int]:
    return [i] + [V.audio_pad_id(n) for n in range(1, 8)]


def _grid_row(codes: list[int]) -> list[int]:
    """One delayed-grid row given as code values (P = pad) -> unified ids, written out per codebook."""
    return [V.audio_offset + n * 1025 + c for n, c in enumerate(codes)]


def _chars(s: str) -> list[int]:
    return list(s.encode())


# ---------------------------------------------------------------- text to audio, 3 frames


CODES = torch.tensor([[100 * f + n for n in range(8)] for f in range(3)])  # frame f, codebook n -> 100 f + n
GRID = [  # apply_delay(CODES) written by hand: stream n starts n rows late
    [0, P, P, P, P, P, P, P],
    [100, 1, P, P, P, P, P, P],
    [200, 101, 2, P, P, P, P, P],
    [P, 201, 102, 3, P, P, P, P],
    [P, P, 202, 103, 4, P, P, P],
    [P, P, P, 203, 104, 5, P, P],
    [P, P, P, P, 204, 105, 6, P],
    [P, P, P, P, P, 205, 106, 7],
    [P, P, P, P, P, P, 206, 107],
    [P, P, P, P, P, P, P, 207],
]
PROMPT = [IM_START, *_chars("user\nhum"), IM_END, NL, IM_START, *_chars("assistant\n")]  # 22 text positions


def test_tta_sample_every_row():
    s = _fmt(cfg_dropout=0.0).format_tta("hum", CODES, random.Random(0))
    assert s["task"] == "tta" and s["audio_features"] is None
    expected_tokens = ([_text_row(i) for i in PROMPT] + [_text_row(V.audio_start_id)] + [_grid_row(r) for r in GRID]
                       + [_text_row(V.audio_end_id), _text_row(IM_END), _text_row(NL)])
    assert len(expected_tokens) == 22 + 1 + 10 + 3
    assert s["tokens"].tolist() == expected_tokens
    assert s["tokens"].dtype == s["labels"].dtype == torch.long and s["loss_weights"].dtype == torch.float32

    ignore, text1 = [X] * 8, [0.0] * 8
    a = 0.125
    expected_labels = ([ignore] * 21  # targets inside the prompt: nothing learned
                       + [[V.audio_start_id] + [X] * 7]  # "\n" after "assistant" -> <|audio_start|>
                       + [_grid_row(r) for r in GRID]  # <|audio_start|>, grid rows 0..8 -> grid rows 0..9
                       + [[V.audio_end_id] + [X] * 7, [IM_END] + [X] * 7]
                       + [ignore, ignore])  # target "\n" after <|im_end|>; the last position has no target
    expected_weights = ([text1] * 21 + [[1.0] + [0.0] * 7] + [[a] * 8] * 10
                        + [[1.0] + [0.0] * 7] * 2 + [text1] * 2)
    assert s["labels"].tolist() == expected_labels
    assert s["loss_weights"].tolist() == expected_weights


def test_weights_are_zero_exactly_where_labels_are_ignored():
    s = _fmt(cfg_dropout=0.0).format_tta("hum", CODES, random.Random(0))
    assert torch.equal(s["loss_weights"] == 0, s["labels"] == X)


def test_custom_weights_are_used():
    s = _fmt(cfg_dropout=0.0, text_weight=2.0, audio_stream_weight=0.5).format_tta("hum", CODES, random.Random(0))
    assert s["loss_weights"][21].tolist() == [2.0] + [0.0] * 7
    assert s["loss_weights"][22].tolist() == [0.5] * 8


def test_tta_rejects_bad_codes():
    with pytest.raises(ValueError):
        _fmt().format_tta("hum", torch.full((2, 8), 1024), random.Random(0))  # a pad is not a code
    with pytest.raises(ValueError):
        _fmt().format_tta("hum", torch.zeros(2, 4, dtype=torch.long), random.Random(0))


# ---------------------------------------------------------------- CFG dropout and prompts


def test_cfg_dropout_pads_the_prompt_and_keeps_everything_else():
    kept = _fmt(cfg_dropout=0.0).format_tta("hum", CODES, random.Random(0))
    dropped = _fmt(cfg_dropout=1.0).format_tta("hum", CODES, random.Random(0))
    assert dropped["tokens"].shape == kept["tokens"].shape  # length kept
    assert dropped["tokens"][:22].tolist() == [_text_row(V.pad_id)] * 22
    assert torch.equal(dropped["tokens"][22:], kept["tokens"][22:])  # <|audio_start|> onwards untouched
    assert torch.equal(dropped["labels"], kept["labels"])
    assert torch.equal(dropped["loss_weights"], kept["loss_weights"])


def test_cfg_dropout_is_deterministic_per_seed():
    fmt = _fmt(cfg_dropout=0.5)

    def pattern(seed: int) -> list[bool]:
        rng = random.Random(seed)
        return [bool(fmt.format_tta("hum", CODES, rng)["tokens"][0, 0] == V.pad_id) for _ in range(40)]

    assert pattern(3) == pattern(3)
    assert pattern(3) != pattern(4)
    assert 5 < sum(pattern(3)) < 35


def test_prompts_match_training_rows():
    fmt = _fmt()
    kept = _fmt(cfg_dropout=0.0).format_tta("hum", CODES, random.Random(0))
    dropped = _fmt(cfg_dropout=1.0).format_tta("hum", CODES, random.Random(0))
    cond = fmt.tta_prompt("hum")
    assert cond.shape == (23, 8) and cond[-1, 0] == V.audio_start_id
    assert torch.equal(cond, kept["tokens"][:23])
    uncond = fmt.unconditional_prompt(len(cond))
    assert torch.equal(uncond, dropped["tokens"][:23])
    with pytest.raises(ValueError):
        fmt.unconditional_prompt(0)


def test_system_prompt_is_dropped_with_the_condition():
    fmt = _fmt(cfg_dropout=1.0, system_prompt="sys")
    s = fmt.format_tta("hum", CODES, random.Random(0))
    sys_len = len([IM_START, *_chars("system\nsys"), IM_END, NL])
    assert fmt.tta_prompt("hum").shape[0] == sys_len + 23
    assert bool((s["tokens"][: sys_len + 22, 0] == V.pad_id).all())


# ---------------------------------------------------------------- understanding


def test_understanding_sample_every_row():
    wav = 0.1 * torch.randn(8000, generator=torch.Generator().manual_seed(0))  # 0.5 s
    n_in = num_encoder_frames(8000)
    assert n_in == 12  # 50 mel frames -> 25 -> 12
    turns = (("user", "<sound>\nWhat?"), ("assistant", "Hum."))
    s = _fmt().format_understanding(turns, wav)
    ids = ([IM_START, *_chars("user\n")] + [V.audio_in_id] * n_in + [*_chars("\nWhat?"), IM_END, NL, IM_START,
           *_chars("assistant\n"), *_chars("Hum."), IM_END, NL])
    assert s["tokens"].tolist() == [_text_row(i) for i in ids]
    start = ids.index(IM_START, 1 + n_in)  # second <|im_start|>: the assistant turn
    answer_at = start + 1 + len("assistant\n")  # first answer token
    expected_labels = [[X] * 8] * len(ids)
    for t in range(answer_at - 1, answer_at + 4):  # targets "Hum." then <|im_end|>
        expected_labels[t] = [ids[t + 1]] + [X] * 7
    assert s["labels"].tolist() == expected_labels
    assert s["loss_weights"][:, 0].tolist() == [1.0 if row[0] != X else 0.0 for row in expected_labels]
    assert float(s["loss_weights"][:, 1:].abs().sum()) == 0.0
    assert s["task"] == "understanding"
    assert s["audio_features"].shape == (128, num_mel_frames(8000)) and s["audio_features"].dtype == torch.float32


def test_multi_turn_learns_every_assistant_turn():
    turns = (("user", "<sound>\nQ1"), ("assistant", "A1"), ("user", "Q2"), ("assistant", "A2"))
    s = _fmt().format_understanding(turns, torch.zeros(16000))
    learned = bytes(int(s["labels"][t, 0]) for t in range(len(s["labels"])) if 0 <= s["labels"][t, 0] < 256)
    assert learned == b"A1A2"
    assert int((s["labels"][:, 0] == IM_END).sum()) == 2


def test_understanding_refuses_clip_without_encoder_frames():
    with pytest.raises(ValueError, match="no audio encoder frame"):
        _fmt().format_understanding((("user", "<sound>"), ("assistant", "x")), torch.zeros(320))  # ceil(320/160)=2 mel frames -> 0 encoder frames


@pytest.mark.parametrize("num_samples", [1, 150, 200, 401, 16000, 23456, 48000])
def test_log_mel_frame_count(num_samples: int):
    feats = LogMel(128)(0.1 * torch.randn(num_samples))
    assert feats.shape == (128, num_mel_frames(num_samples))
    assert bool(torch.isfinite(feats).all())


# ---------------------------------------------------------------- text and dispatch


def test_text_sample_learns_only_assistant_turns():
    rec = TextRecord((("system", "S"), ("user", "2+2?"), ("assistant", "4"), ("user", "and 3+3?"),
                      ("assistant", "6")))
    s = _fmt().format(rec, random.Random(0))
    assert s["task"] == "text" and s["audio_features"] is None
    expected = ([IM_START, *_chars("system\nS"), IM_END, NL, IM_START, *_chars("user\n2+2?"), IM_END, NL,
                 IM_START, *_chars("assistant\n4"), IM_END, NL, IM_START, *_chars("user\nand 3+3?"), IM_END, NL,
                 IM_START, *_chars("assistant\n6"), IM_END, NL])
    assert s["tokens"][:, 0].tolist() == expected
    assert bool((s["tokens"][:, 1:] == V.audio_pad_ids()[1:]).all())
    targets = [int(x) for x in s["labels"][:, 0] if x != X]
    assert targets == [ord("4"), IM_END, ord("6"), IM_END]


def test_format_dispatch_needs_audio_inputs(tmp_path):
    fmt = _fmt()
    with pytest.raises(ValueError, match="codec tokens"):
        fmt.format(TTARecord(tmp_path / "a.wav", 0.0, 1.0, "hum"), random.Random(0))
    with pytest.raises(ValueError, match="waveform"):
        fmt.format(UnderstandingRecord(tmp_path / "a.wav", (("user", "<sound>"), ("assistant", "x"))),
                   random.Random(0))
    s = fmt.format(TTARecord(tmp_path / "a.wav", 0.0, 1.0, "hum"), random.Random(0), codes=CODES)
    assert s["task"] == "tta"


def test_from_config_uses_the_model_weights():
    from ualm_nemo.model.config import AudioInputConfig, AudioOutputConfig, BACKBONES, UALMConfig

    cfg = UALMConfig(backbone=BACKBONES["tiny"], audio_in=AudioInputConfig(random_encoder=True),
                     audio_out=AudioOutputConfig(audio_stream_weight=0.25))
    fmt = SampleFormatter.from_config(TOK, cfg, cfg_dropout=0.0)
    assert fmt.vocab == V and fmt.audio_stream_weight == 0.25 and fmt.text_weight == 1.0 and fmt.n_mels == 128
    assert fmt.format_tta("hum", CODES, random.Random(0))["loss_weights"][22].tolist() == [0.25] * 8


def test_tokenizer_larger_than_text_vocab_is_refused():
    with pytest.raises(ValueError, match="text_vocab_size"):
        SampleFormatter(TOK, UnifiedVocab(text_vocab_size=200))
