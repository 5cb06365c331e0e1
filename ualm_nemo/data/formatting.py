r"""Records -> model samples: ChatML layout over 8 streams, next-token labels and per-stream loss weights.

A sample (``Sample``) holds, for a sequence of L positions:

    tokens        LongTensor  [L, 8]   unified-vocab ids (model/vocab.py)
    labels        LongTensor  [L, 8]   labels[t] = tokens[t + 1]; IGNORE_INDEX where nothing is learned
    loss_weights  FloatTensor [L, 8]   0 wherever labels is IGNORE_INDEX
    audio_features FloatTensor [128, mel_frames] Whisper log-mel (understanding samples only, else None);
                  a conversation with several heard clips: a list of them, in placeholder order
    task          "tta" | "understanding" | "text" | "conversation"

Position kinds (stream 0 | streams 1..7):

    text position          text/special id | codebook pads         vocab.text_position_streams(id)
    audio-in placeholder   <|audio_in|>    | codebook pads         one per 25 Hz encoder frame
    generated-audio grid   codebook n's ids of apply_delay(codes) on stream n: F + 7 rows between
                           <|audio_start|> and <|audio_end|>

Targets: only the content of assistant turns and their ``<|im_end|>`` are learned. A text target is learned on
stream 0 (weight ``text_weight``; streams 1..7 IGNORE); a grid target on all 8 streams (``audio_stream_weight``
each, delay pads included). Text to audio, F codec frames (row t's label is row t + 1's tokens)::

    row(s)                                   label                 weight
    <|im_start|>user\n{caption}<|im_end|>\n   IGNORE                0
    <|im_start|>assistant                    IGNORE                0
    \n                                       <|audio_start|>       text_weight on stream 0
    <|audio_start|>, grid rows 0..F+5        grid rows 0..F+6      audio_stream_weight x 8
    grid row F+6                             <|audio_end|>         text_weight on stream 0
    <|audio_end|>                            <|im_end|>            text_weight on stream 0
    <|im_end|>, \n                           IGNORE                0

Conversations (``format_conversation``; the post-training records of data/conversation.py): turns of parts, in
the rows ``conversation_prompt`` builds for the same turns (one private row builder, ``_conversation_rows``).
A str part is its text's ids; an ``AudioIn`` (heard, system/user turns) is one ``<|audio_in|>`` per encoder
frame with its log-mel in ``audio_features``; an ``AudioOut`` (written, assistant turns) is ``<|audio_start|>``,
the delayed grid and ``<|audio_end|>``. A learned assistant turn learns every target inside it: text and
``<|audio_start|>`` / ``<|audio_end|>`` on stream 0 (``text_weight``), the grid on all 8 streams
(``audio_stream_weight``), and its ``<|im_end|>``; system and user turns, and assistant turns with learn False,
learn nothing. ``audio_features`` is None (no heard clip), one tensor [n_mel, T] (one clip, as for
understanding) or a list of them in placeholder order (several clips); ``sample_clips`` reads all three.

CFG condition dropout of a conversation (probability ``cfg_dropout``, drawn once per sample in which a learned
assistant turn writes audio; T = the last such turn), matching the decoder's unconditional row (<|pad|> at
every position but the current turn's audio segments)::

    rows before T, and T's text before / between its audio segments   -> pad rows, labels IGNORE, except the
                                                                          row before T's first <|audio_start|>,
                                                                          which still predicts it
    T's audio segments (<|audio_start|>, grid, <|audio_end|>)         -> kept (a target in a pad row is not
                                                                          learned)
    the rest of T after its last <|audio_end|> (text, <|im_end|>, \n) -> kept as written
    turns after T                                                     -> pad rows, labels IGNORE

Heard clips whose placeholders became pads leave ``audio_features``. For a one-turn text-to-audio conversation
this is ``format_tta``'s rule, row for row.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Mapping, Sequence, TypedDict, Union

import numpy as np
import torch

from ualm_nemo.data.raw import AUDIO_TAG, Record, TextRecord, TTARecord, Turn, UnderstandingRecord
from ualm_nemo.data.tokenizer import TextTokenizer
from ualm_nemo.model.audio_frames import SAMPLE_RATE, num_encoder_frames, num_mel_frames
from ualm_nemo.model.config import UALMConfig
from ualm_nemo.model.delay_pattern import apply_delay
from ualm_nemo.model.vocab import IGNORE_INDEX, UnifiedVocab

N_FFT = 400

# what a position is as a *target* (what predicting it costs)
_NO_LOSS, _TEXT, _AUDIO = 0, 1, 2


class Sample(TypedDict):
    tokens: torch.Tensor  # [L, 8] long
    labels: torch.Tensor  # [L, 8] long
    loss_weights: torch.Tensor  # [L, 8] float32
    audio_features: torch.Tensor | list[torch.Tensor] | None  # [n_mel, mel_frames] float32 (a list: several clips)
    task: str


def sample_clips(sample: Mapping[str, Any]) -> list[torch.Tensor]:
    """A sample's heard clips [n_mel, frames] in placeholder order, whichever form ``audio_features`` has."""
    feats = sample.get("audio_features")
    if feats is None:
        return []
    return [feats] if isinstance(feats, torch.Tensor) else list(feats)


@dataclass(frozen=True)
class AudioIn:
    """Audio the model listens to (encoder input): a 16 kHz mono waveform [samples]."""

    waveform: torch.Tensor


@dataclass(frozen=True)
class AudioOut:
    """Audio the assistant wrote earlier in the conversation: codec codes [F, N] (rendered as its grid)."""

    codes: torch.Tensor


@dataclass(frozen=True)
class AudioInLength:
    """A heard clip known by its length alone (``conversation_length``): ``num_samples`` at 16 kHz."""

    num_samples: int


@dataclass(frozen=True)
class AudioOutLength:
    """A written clip known by its length alone (``conversation_length``): ``num_frames`` codec frames."""

    num_frames: int


Part = Union[str, AudioIn, AudioOut]
ChatTurn = tuple[str, Sequence[Part]]  # (role, content parts in order)
ROLES = ("system", "user", "assistant")


@dataclass
class _Rows:
    """What ``_conversation_rows`` built: the rows, each heard clip's log-mel and placeholder rows, each written
    segment's rows (``<|audio_start|>`` .. ``<|audio_end|>``), each turn's rows; spans are (turn, start, end)."""

    builder: "_Builder"
    clips: list[torch.Tensor]
    heard: list[tuple[int, int, int]]
    written: list[tuple[int, int, int]]
    turns: list[tuple[int, int]]


def tagged_parts(text: str, clips: Sequence[AudioIn]) -> list[Part]:
    """Text holding one AUDIO_TAG per clip (AF3's ``<sound>``) -> parts with the clips where the tags are."""
    pieces = text.split(AUDIO_TAG)
    if len(pieces) - 1 != len(clips):
        raise ValueError(f"{len(pieces) - 1} {AUDIO_TAG} tags for {len(clips)} audio clips")
    parts: list[Part] = [pieces[0]]
    for clip, piece in zip(clips, pieces[1:]):
        parts += [clip, piece]
    return [p for p in parts if not isinstance(p, str) or p]


class LogMel:
    """Whisper log-mel at 100 Hz, not padded to 30 s; frame count = audio_frames.num_mel_frames(samples)."""

    def __init__(self, n_mels: int = 128):
        from transformers import WhisperFeatureExtractor  # heavy import, only when audio input is used

        self.n_mels = n_mels
        self._fe = WhisperFeatureExtractor(feature_size=n_mels, sampling_rate=SAMPLE_RATE, hop_length=160,
                                           n_fft=N_FFT)

    def __call__(self, wav: torch.Tensor) -> torch.Tensor:
        """wav [samples] at 16 kHz -> [n_mels, num_mel_frames(samples)] float32."""
        n = int(wav.shape[0])
        x = wav.float().cpu().numpy()
        if n <= N_FFT:  # the STFT's reflect padding needs more than n_fft / 2 samples
            x = np.pad(x, (0, N_FFT + 1 - n))
        feats = self._fe(x, sampling_rate=SAMPLE_RATE, return_tensors="np", padding="do_not_pad",
                         return_attention_mask=False).input_features[0]  # [n_mels, max(n, 401) // 160]
        feats = torch.from_numpy(np.ascontiguousarray(feats)).float()
        want = num_mel_frames(n)
        if feats.shape[1] < want:  # never hit for the current extractor; kept so the count is a guarantee
            feats = torch.cat([feats, feats[:, -1:].expand(-1, want - feats.shape[1])], dim=1)
        return feats[:, :want]


class _Builder:
    """Accumulates [k, 8] token rows with a target kind per row, then derives labels and weights."""

    def __init__(self, vocab: UnifiedVocab):
        self.vocab = vocab
        self._pads = vocab.audio_pad_ids()  # [8]
        self._rows: list[torch.Tensor] = []
        self._kinds: list[torch.Tensor] = []
        self.length = 0

    def _add(self, rows: torch.Tensor, kind: int) -> None:
        self._rows.append(rows)
        self._kinds.append(torch.full((rows.shape[0],), kind, dtype=torch.int8))
        self.length += rows.shape[0]

    def text(self, ids: Sequence[int], kind: int = _NO_LOSS) -> None:
        rows = self._pads.expand(len(ids), -1).clone()  # [k, 8]
        rows[:, 0] = torch.as_tensor(list(ids), dtype=torch.long)
        self._add(rows, kind)

    def audio_in(self, num_frames: int) -> None:
        self.text([self.vocab.audio_in_id] * num_frames)

    def audio_grid(self, codes: torch.Tensor, kind: int = _AUDIO) -> None:
        """codes [F, 8] -> delayed grid [F + 7, 8] in unified ids, learned on every stream (unless kind says no)."""
        delayed = apply_delay(codes.long(), pad=self.vocab.codebook_size)  # [F + 7, 8], pad = code value 1024
        self._add(self.vocab.codes_to_ids(delayed), kind)

    def build(self, text_weight: float, audio_stream_weight: float) -> tuple[torch.Tensor, ...]:
        tokens = torch.cat(self._rows)  # [L, 8]
        target_kind = torch.cat(self._kinds)[1:]  # [L - 1]: kind of tokens[t + 1]
        labels = torch.full_like(tokens, IGNORE_INDEX)
        weights = torch.zeros(tokens.shape, dtype=torch.float32)
        labels[:-1] = tokens[1:]
        labels[:-1][target_kind == _NO_LOSS] = IGNORE_INDEX
        labels[:-1][target_kind == _TEXT, 1:] = IGNORE_INDEX
        weights[:-1][target_kind == _TEXT, 0] = text_weight
        weights[:-1][target_kind == _AUDIO] = audio_stream_weight
        return tokens, labels, weights


class SampleFormatter:
    """Builds the samples of every task in one ChatML layout; holds the tokenizer, vocab and loss weights."""

    def __init__(self, tokenizer: TextTokenizer, vocab: UnifiedVocab, *, text_weight: float = 1.0,
                 audio_stream_weight: float = 0.125, cfg_dropout: float = 0.05, system_prompt: str | None = None,
                 n_mels: int = 128):
        if tokenizer.vocab_size > vocab.text_vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but model.backbone.text_vocab_size is "
                             f"{vocab.text_vocab_size}: pick a larger backbone or a smaller tokenizer")
        if not 0.0 <= cfg_dropout <= 1.0:
            raise ValueError(f"cfg_dropout={cfg_dropout} must lie in [0, 1]")
        self.tokenizer, self.vocab = tokenizer, vocab
        self.text_weight, self.audio_stream_weight = text_weight, audio_stream_weight
        self.cfg_dropout = cfg_dropout
        self.system_prompt = system_prompt
        self.n_mels = n_mels
        self._log_mel: LogMel | None = None  # built on first understanding sample
        self._newline = tokenizer.encode("\n")

    @classmethod
    def from_config(cls, tokenizer: TextTokenizer, config: UALMConfig, **kw) -> "SampleFormatter":
        """Vocabulary, loss weights and mel bins taken from the model config (``kw``: cfg_dropout, system_prompt)."""
        return cls(tokenizer, config.vocab, text_weight=config.audio_out.text_weight,
                   audio_stream_weight=config.audio_out.audio_stream_weight, n_mels=config.audio_in.num_mel_bins, **kw)

    # --- ChatML pieces -------------------------------------------------------------------------
    def _open(self, b: _Builder, role: str) -> None:
        b.text([self.tokenizer.im_start_id, *self.tokenizer.encode(f"{role}\n")])

    def _close(self, b: _Builder, learned: bool) -> None:
        b.text([self.tokenizer.im_end_id], _TEXT if learned else _NO_LOSS)
        b.text(self._newline)

    def _turn(self, b: _Builder, role: str, content: str, num_audio_frames: int = 0) -> None:
        """``<|im_start|>{role}\\n{content}<|im_end|>\\n``; AUDIO_TAG in content becomes the placeholder run."""
        learned = role == "assistant"
        self._open(b, role)
        parts = content.split(AUDIO_TAG)
        for k, part in enumerate(parts):
            if k:
                b.audio_in(num_audio_frames)
            b.text(self.tokenizer.encode(part), _TEXT if learned else _NO_LOSS)
        self._close(b, learned)

    def _new(self) -> _Builder:
        b = _Builder(self.vocab)
        if self.system_prompt is not None:
            self._turn(b, "system", self.system_prompt)
        return b

    def _finish(self, b: _Builder, task: str, audio_features: torch.Tensor | None = None) -> Sample:
        tokens, labels, weights = b.build(self.text_weight, self.audio_stream_weight)
        return Sample(tokens=tokens, labels=labels, loss_weights=weights, audio_features=audio_features, task=task)

    # --- text to audio -------------------------------------------------------------------------
    def _tta_prefix(self, caption: str) -> _Builder:
        """Everything before <|audio_start|>: the user turn and the assistant header."""
        b = self._new()
        self._turn(b, "user", caption)
        self._open(b, "assistant")
        return b

    def tta_prompt(self, caption: str) -> torch.Tensor:
        """Conditional generation prompt [P, 8], ending with <|audio_start|> (same rows as in training)."""
        b = self._tta_prefix(caption)
        b.text([self.vocab.audio_start_id])
        return b.build(self.text_weight, self.audio_stream_weight)[0]

    def unconditional_prompt(self, length: int) -> torch.Tensor:
        """CFG's unconditional prompt [length, 8]: length - 1 pad text positions, then <|audio_start|>.

        ``unconditional_prompt(len(tta_prompt(c)))`` equals the first rows of a condition-dropped sample.
        """
        if length < 1:
            raise ValueError(f"length={length} must hold at least <|audio_start|>")
        b = _Builder(self.vocab)
        b.text([self.vocab.pad_id] * (length - 1) + [self.vocab.audio_start_id])
        return b.build(self.text_weight, self.audio_stream_weight)[0]

    def format_tta(self, caption: str, codes: torch.Tensor, rng: random.Random) -> Sample:
        """caption + codes [F, 8] -> sample; with probability cfg_dropout the prompt becomes pads (CFG)."""
        v = self.vocab
        self._check_codes(codes)
        b = self._tta_prefix(caption)
        prompt_len = b.length
        b.text([v.audio_start_id], _TEXT)  # the first assistant token picks the modality: learned
        b.audio_grid(codes)
        b.text([v.audio_end_id, self.tokenizer.im_end_id], _TEXT)
        b.text(self._newline)
        sample = self._finish(b, "tta")
        if rng.random() < self.cfg_dropout:  # drawn for every sample so the stream does not depend on outcomes
            # labels of these rows are IGNORE already (their targets are prompt tokens), so only tokens change
            sample["tokens"][:prompt_len] = self.unconditional_prompt(prompt_len + 1)[:prompt_len]
        return sample

    def _check_codes(self, codes: torch.Tensor) -> None:
        v = self.vocab
        if codes.dim() != 2 or codes.shape[1] != v.num_codebooks or codes.shape[0] == 0:
            raise ValueError(f"codes must be [F >= 1, {v.num_codebooks}], got {tuple(codes.shape)}")
        if int(codes.min()) < 0 or int(codes.max()) >= v.codebook_size:
            raise ValueError(f"codes must lie in [0, {v.codebook_size})")

    # --- prompts for decoding ------------------------------------------------------------------
    def conversation_prompt(self, turns: Sequence[ChatTurn]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """A conversation -> (prompt [L, 8] through ``<|im_start|>assistant\n``, log-mel of each AudioIn).

        The rows are those training builds for the same turns (``_conversation_rows``, as ``format_conversation``;
        an assistant ``AudioOut`` as ``<|audio_start|>``, its delayed grid, ``<|audio_end|>``), so the model
        continues the assistant turn as it learned to. The conversation must hold a user turn and must not end
        with the assistant.
        """
        roles = [role for role, _ in turns]
        if "user" not in roles:
            raise ValueError("a conversation needs at least one user turn")
        if roles[-1] == "assistant":
            raise ValueError("the conversation ends with an assistant turn: nothing is left to generate")
        rows = self._conversation_rows(turns, [False] * len(turns))
        self._open(rows.builder, "assistant")
        return rows.builder.build(self.text_weight, self.audio_stream_weight)[0], rows.clips

    def prompt_length(self, turns: Sequence[ChatTurn]) -> int:
        """Positions of ``conversation_prompt(turns)`` without log-mel: what a context limit is checked on before
        anything is computed for the clips or allocated for decoding."""
        rows = self._conversation_rows(turns, [False] * len(turns), listen=False)
        self._open(rows.builder, "assistant")
        return rows.builder.length

    def _conversation_rows(self, turns: Sequence[ChatTurn], learn: Sequence[bool], listen: bool = True) -> _Rows:
        """The one layout of a conversation's turns (see the module docstring); ``listen=False`` skips log-mel
        (lengths only). AudioInLength / AudioOutLength stand for clips known by their length alone."""
        b = self._new()
        rows = _Rows(b, [], [], [], [])
        for k, ((role, parts), learned) in enumerate(zip(turns, learn)):
            if role not in ROLES:
                raise ValueError(f"unknown role {role!r} (system, user, assistant)")
            first = b.length
            kind = _TEXT if learned else _NO_LOSS
            self._open(b, role)
            for part in ([parts] if isinstance(parts, str) else parts):
                if isinstance(part, str):
                    b.text(self.tokenizer.encode(part), kind)
                elif isinstance(part, (AudioIn, AudioInLength)) and role != "assistant":
                    if isinstance(part, AudioIn):
                        if listen:
                            rows.clips.append(self._listen(part.waveform))
                        num_samples = int(part.waveform.shape[-1])
                    else:
                        num_samples = part.num_samples
                    frames = num_encoder_frames(num_samples)
                    if frames < 1:
                        raise ValueError(f"a clip of {num_samples} samples gives no audio encoder frame")
                    rows.heard.append((k, b.length, b.length + frames))
                    b.audio_in(frames)
                elif isinstance(part, (AudioOut, AudioOutLength)) and role == "assistant":
                    if isinstance(part, AudioOut):
                        self._check_codes(part.codes)
                        codes = part.codes
                    else:
                        if part.num_frames < 1:
                            raise ValueError(f"a written clip needs at least one codec frame, got {part.num_frames}")
                        codes = torch.zeros(part.num_frames, self.vocab.num_codebooks, dtype=torch.long)
                    seg = b.length
                    b.text([self.vocab.audio_start_id], kind)  # the model picks the modality: learned
                    b.audio_grid(codes, _AUDIO if learned else _NO_LOSS)
                    b.text([self.vocab.audio_end_id], kind)
                    rows.written.append((k, seg, b.length))
                else:
                    raise ValueError(f"a {role} turn cannot hold {type(part).__name__}")
            self._close(b, learned)
            rows.turns.append((first, b.length))
        return rows

    @staticmethod
    def _learn_flags(turns: Sequence[ChatTurn], learn: Sequence[bool] | None) -> list[bool]:
        roles = [role for role, _ in turns]
        if learn is None:
            return [role == "assistant" for role in roles]
        flags = [bool(x) for x in learn]
        if len(flags) != len(roles):
            raise ValueError(f"{len(flags)} learn flags for {len(roles)} turns")
        bad = [k for k, (role, flag) in enumerate(zip(roles, flags)) if flag and role != "assistant"]
        if bad:
            raise ValueError(f"turn {bad[0]} is a {roles[bad[0]]} turn: only assistant turns are learned")
        return flags

    def format_conversation(self, turns: Sequence[ChatTurn], rng: random.Random,
                            learn: Sequence[bool] | None = None) -> Sample:
        """A conversation -> sample (task "conversation"): the rows of ``conversation_prompt`` for the same turns,
        each learned assistant turn's targets learned (``learn``: one flag per turn, default: the assistant turns).

        With probability ``cfg_dropout`` (one draw, only when a learned assistant turn writes audio) the
        condition is dropped as the module docstring says; the length never changes.
        """
        flags = self._learn_flags(turns, learn)
        if not any(flags):
            raise ValueError("a conversation sample needs a learned assistant turn")
        rows = self._conversation_rows(turns, flags)
        tokens, labels, weights = rows.builder.build(self.text_weight, self.audio_stream_weight)
        clips = rows.clips
        writers = sorted({k for k, _, _ in rows.written if flags[k]})
        if writers and rng.random() < self.cfg_dropout:
            last = writers[-1]
            segments = [(a, z) for k, a, z in rows.written if k == last]
            pad = torch.ones(tokens.shape[0], dtype=torch.bool)  # rows that become <|pad|>
            for a, z in segments:
                pad[a:z] = False
            pad[segments[-1][1]: rows.turns[last][1]] = False  # the rest of the turn, as written
            tokens[pad] = torch.tensor(self.vocab.text_position_streams(self.vocab.pad_id))
            learnable = ~pad[:-1] & ~pad[1:]  # label at t: neither row t nor its target t + 1 is a pad row
            learnable[segments[0][0] - 1] = True  # the row before the first <|audio_start|> still predicts it
            labels[:-1][~learnable] = IGNORE_INDEX
            weights[:-1][~learnable] = 0.0
            clips = [c for c, (_, a, _) in zip(clips, rows.heard) if not bool(pad[a])]
        features = None if not clips else clips[0] if len(clips) == 1 else clips
        return Sample(tokens=tokens, labels=labels, loss_weights=weights, audio_features=features,
                      task="conversation")

    def conversation_length(self, turns: Sequence[ChatTurn]) -> int:
        """Positions of ``format_conversation(turns)`` (CFG dropout keeps the length) without codec or log-mel:
        parts may be AudioInLength(num_samples) / AudioOutLength(num_frames) instead of the clips."""
        return self._conversation_rows(turns, [False] * len(turns), listen=False).builder.length

    def _listen(self, waveform: torch.Tensor) -> torch.Tensor:
        """16 kHz waveform [samples] -> log-mel [n_mel, frames] (the encoder's input)."""
        if waveform.dim() != 1 or num_encoder_frames(int(waveform.shape[0])) < 1:
            raise ValueError(f"audio input must be a mono waveform long enough for one encoder frame, got "
                             f"{tuple(waveform.shape)}")
        if not bool(torch.isfinite(waveform).all()):
            raise ValueError("audio input holds NaN or infinite samples")
        if self._log_mel is None:
            self._log_mel = LogMel(self.n_mels)
        return self._log_mel(waveform)

    # --- understanding and text ----------------------------------------------------------------
    def format_understanding(self, turns: Sequence[Turn], waveform: torch.Tensor) -> Sample:
        """turns (one user turn holds AUDIO_TAG) + waveform [samples] at 16 kHz -> sample with log-mel."""
        if sum(text.count(AUDIO_TAG) for _, text in turns) != 1:
            raise ValueError(f"an understanding sample needs exactly one {AUDIO_TAG} tag")
        if self._log_mel is None:
            self._log_mel = LogMel(self.n_mels)
        b = self._understanding_rows(turns, int(waveform.shape[0]))
        return self._finish(b, "understanding", self._log_mel(waveform))

    def _understanding_rows(self, turns: Sequence[Turn], num_samples: int) -> _Builder:
        num_frames = num_encoder_frames(num_samples)
        if num_frames < 1:
            raise ValueError(f"a clip of {num_samples} samples gives no audio encoder frame")
        b = self._new()
        for role, text in turns:
            self._turn(b, role, text, num_audio_frames=num_frames)
        return b

    def _text_rows(self, turns: Sequence[Turn]) -> _Builder:
        if any(AUDIO_TAG in text for _, text in turns):
            raise ValueError(f"a text sample must not hold {AUDIO_TAG}")
        b = self._new()
        for role, text in turns:
            self._turn(b, role, text)
        return b

    def format_text(self, turns: Sequence[Turn]) -> Sample:
        return self._finish(self._text_rows(turns), "text")

    # --- lengths without building the sample (no codec, no log-mel) -----------------------------
    def tta_length(self, caption: str, num_codec_frames: int) -> int:
        """Positions of ``format_tta(caption, codes [num_codec_frames, 8])``: prompt, start, delayed grid, end."""
        grid = num_codec_frames + self.vocab.num_codebooks - 1
        return self._tta_prefix(caption).length + 1 + grid + 2 + len(self._newline)

    def understanding_length(self, turns: Sequence[Turn], num_samples: int) -> int:
        """Positions of ``format_understanding(turns, waveform)`` for a 16 kHz waveform of ``num_samples``."""
        return self._understanding_rows(turns, num_samples).length

    def text_length(self, turns: Sequence[Turn]) -> int:
        return self._text_rows(turns).length

    def format(self, record: Record, rng: random.Random, *, codes: torch.Tensor | None = None,
               waveform: torch.Tensor | None = None) -> Sample:
        """Dispatch on the record type; TTA needs its ``codes`` [F, 8], understanding its ``waveform``."""
        if isinstance(record, TTARecord):
            if codes is None:
                raise ValueError("a TTA record needs its codec tokens (codes=[F, 8])")
            return self.format_tta(record.caption, codes, rng)
        if isinstance(record, UnderstandingRecord):
            if waveform is None:
                raise ValueError("an understanding record needs its waveform")
            return self.format_understanding(record.turns, waveform)
        if isinstance(record, TextRecord):
            return self.format_text(record.turns)
        raise TypeError(f"unknown record type {type(record).__name__}")
