"""Conversations in, replies out: formatting -> batched decoding -> codec decode -> optional post-processor.

``UALMInference`` is what the commands (examples/generate.py, examples/chat.py) and the reasoning modes use.
A reply is the assistant turn as the model wrote it: text and audio parts in order. Its audio is decoded by
X-Codec (16 kHz mono) and then handed to the post-processor, where the 48 kHz enhancement VAE plugs in;
without one, audio stays at the codec's rate.

Input checks (``UALMInference.prepare``, before any log-mel is computed or anything is allocated for decoding):
a heard clip must be a finite mono waveform of at least one encoder frame (``MIN_CLIP_SAMPLES``), and the
**context rule**: the prompt's positions (``SampleFormatter.prompt_length``: text tokens, one per encoder frame
of each heard clip, earlier assistant audio grids) plus the reply's budget (``max_text_tokens`` for a text-only
reply, ``GenerationConfig.max_new_positions`` when it may write audio) must not exceed the context limit: the
model's ``max_position_embeddings``, or ``max_context`` when that is smaller. Nothing is truncated: a
conversation that breaks a rule raises ``InputRejected`` with one line saying why, which the commands count
(evaluation) or print (chat).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ualm_nemo.data.formatting import AudioIn, AudioOut, ChatTurn, SampleFormatter
from ualm_nemo.inference.engine import GenerationConfig, Mode, Request, Result
from ualm_nemo.inference.generate import make_decoder, model_config, model_vocab
from ualm_nemo.inference.postprocess import AudioPostProcessor
from ualm_nemo.model.audio_frames import num_encoder_frames

MIN_CLIP_SAMPLES = next(n for n in range(1, 16000) if num_encoder_frames(n) >= 1)  # 16 kHz samples of one frame


class InputRejected(ValueError):
    """A conversation the model cannot take; the message is one line saying why, ``what`` names the part at
    fault ("audio": a heard clip, "prompt": the context rule, "model": no audio input). Raised before decoding
    starts, so a caller can count the item and go on."""

    def __init__(self, what: str, message: str):
        super().__init__(message)
        self.what = what


@dataclass
class ReplyAudio:
    codes: torch.Tensor  # [F, N] codec codes
    wav: torch.Tensor | None = None  # [channels, samples] after the post-processor; None without a codec
    sample_rate: int | None = None
    codec_wav: torch.Tensor | None = None  # [samples] at the codec's rate (what the model "hears" back)

    @property
    def seconds(self) -> float:
        return self.codes.shape[0] / 50.0  # X-Codec: 50 frames per second


@dataclass
class Reply:
    parts: list[str | ReplyAudio] = field(default_factory=list)
    stop: str = "end"  # "end": the model closed its turn; "length": the text budget ran out

    @property
    def text(self) -> str:
        return "".join(p for p in self.parts if isinstance(p, str))

    @property
    def audio(self) -> list[ReplyAudio]:
        return [p for p in self.parts if isinstance(p, ReplyAudio)]

    def as_turn(self) -> ChatTurn:
        """The reply as an assistant turn of the conversation that continues from it."""
        return ("assistant", [p if isinstance(p, str) else AudioOut(p.codes) for p in self.parts])


class UALMInference:
    """Batched replies from either model form (HF-side class or the Megatron model at PP=1)."""

    def __init__(self, model, tokenizer, codec=None, postprocess: AudioPostProcessor | None = None,
                 use_cache: bool = True, system_prompt: str | None = None, batch_size: int = 16,
                 max_context: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if max_context is not None and max_context < 1:
            raise ValueError(f"max_context={max_context} must be >= 1")
        own = model_config(model).backbone.max_position_embeddings
        self.max_context = own if max_context is None else min(max_context, own)  # the context rule's limit
        self.model, self.tokenizer, self.codec, self.postprocess = model, tokenizer, codec, postprocess
        self.vocab = model_vocab(model)
        self.formatter = SampleFormatter(tokenizer, self.vocab, cfg_dropout=0.0, system_prompt=system_prompt,
                                         n_mels=model_config(model).audio_in.num_mel_bins)
        stop = sorted({tokenizer.im_end_id, *tokenizer.eos_ids})
        self.decoder = make_decoder(model, tokenizer.vocab_size, stop, use_cache)
        self.batch_size = batch_size

    @property
    def listens(self) -> bool:
        """Whether the model takes audio input (audio understanding, self-reflection)."""
        return model_config(self.model).audio_in.enabled

    def reply(self, conversations: Sequence[Sequence[ChatTurn]], mode: Mode = "auto",
              seeds: Sequence[int] | None = None, cfg: GenerationConfig | None = None) -> list[Reply]:
        """The assistant's next turn for each conversation, ``batch_size`` at a time."""
        seeds = list(seeds) if seeds is not None else list(range(len(conversations)))  # distinct by default
        if len(seeds) != len(conversations):
            raise ValueError(f"{len(seeds)} seeds for {len(conversations)} conversations")
        return self.decode([self.prepare(c, mode, s, cfg) for c, s in zip(conversations, seeds)], cfg)

    def decode(self, requests: Sequence[Request], cfg: GenerationConfig | None = None) -> list[Reply]:
        """The replies to prepared requests (``prepare``), ``batch_size`` at a time."""
        replies: list[Reply] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start:start + self.batch_size]
            replies += [self._reply(result) for result in self.decoder.generate(chunk, cfg)]
        return replies

    def text_to_audio(self, captions: Sequence[str], seeds: Sequence[int] | None = None,
                      cfg: GenerationConfig | None = None) -> list[Reply]:
        """TTA: one user turn per caption, audio forced."""
        for caption in captions:
            if not caption.strip():
                raise ValueError("an empty caption gives the model nothing to generate from")
        return self.reply([[("user", [c])] for c in captions], "audio", seeds, cfg)

    def prepare(self, conversation: Sequence[ChatTurn], mode: Mode = "auto", seed: int = 0,
                cfg: GenerationConfig | None = None) -> Request:
        """The request for one conversation after the input checks (module docstring); InputRejected says why
        a conversation cannot be answered."""
        clips = [p for _, parts in conversation for p in parts if isinstance(p, AudioIn)]
        if clips and not self.listens:
            raise InputRejected("model", "this model has no audio input (model.audio_in.enabled=false): "
                                         "it cannot listen")
        for k, clip in enumerate(clips, 1):
            check_clip(clip.waveform, f"audio input {k}")
        self.check_length(self.formatter.prompt_length(conversation), mode, cfg or GenerationConfig())
        prompt, features = self.formatter.conversation_prompt(conversation)
        return Request(prompt=prompt, audio_features=features, mode=mode, seed=seed)

    def check_length(self, prompt_positions: int, mode: Mode, cfg: GenerationConfig) -> None:
        """The context rule (module docstring): InputRejected when the prompt and the reply's budget overflow."""
        budget = cfg.max_text_tokens if mode == "text" else cfg.max_new_positions(self.vocab.num_codebooks)
        if prompt_positions + budget > self.max_context:
            raise InputRejected("prompt", f"prompt too long: {prompt_positions} positions + a reply budget of "
                                          f"{budget} exceed the context limit of {self.max_context} (shorten the "
                                          "input or start a new conversation)")

    def _reply(self, result: Result) -> Reply:
        parts: list[str | ReplyAudio] = []
        for segment in result.segments:
            if segment.kind == "text":
                parts.append(self.tokenizer.decode(segment.text_ids))
            else:
                parts.append(self._audio(segment.codes))
        return Reply(parts, result.stop)

    def _audio(self, codes: torch.Tensor) -> ReplyAudio:
        if self.codec is None:
            return ReplyAudio(codes)
        codec_wav = self.codec.decode(codes).float()  # [samples] at 16 kHz
        if self.postprocess is None:
            return ReplyAudio(codes, codec_wav[None], self.codec.sample_rate, codec_wav)
        return ReplyAudio(codes, self.postprocess(codec_wav), self.postprocess.sample_rate, codec_wav)


def check_clip(waveform: torch.Tensor, name: str) -> None:
    """InputRejected unless ``waveform`` is a finite mono 16 kHz clip long enough for one encoder frame."""
    if waveform.dim() != 1:
        raise InputRejected("audio", f"{name}: expected a mono waveform, got shape {tuple(waveform.shape)}")
    if waveform.shape[0] < MIN_CLIP_SAMPLES:
        raise InputRejected("audio", f"{name}: too short ({waveform.shape[0]} samples at 16 kHz; one encoder "
                                     f"frame needs {MIN_CLIP_SAMPLES}, {1000 * MIN_CLIP_SAMPLES / 16000:g} ms)")
    if not bool(torch.isfinite(waveform).all()):
        raise InputRejected("audio", f"{name}: holds NaN or infinite samples")


def load_model(path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None):
    """An exported HF folder (``ualm_config.json`` inside) or a training checkpoint (any TP/PP layout)
    -> ``UALMForConditionalGeneration`` on ``device``, with a clear error when ``path`` is neither."""
    from ualm_nemo.convert.audio_parts import UALM_CONFIG_FILE
    from ualm_nemo.inference.hf_model import UALMForConditionalGeneration

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint or HF folder at {path}")
    if (path / UALM_CONFIG_FILE).is_file():
        model = UALMForConditionalGeneration.from_pretrained(path, dtype=dtype)
    else:
        model = UALMForConditionalGeneration.from_checkpoint(path, dtype=dtype)
    return model.to(device)
