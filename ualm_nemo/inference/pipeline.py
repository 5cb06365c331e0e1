"""Conversations in, replies out: formatting -> batched decoding -> codec decode -> optional post-processor.

``UALMInference`` is what the commands (examples/generate.py, examples/chat.py) and the reasoning modes use.
A reply is the assistant turn as the model wrote it: text and audio parts in order. Its audio is decoded by
X-Codec (16 kHz mono) and then handed to the post-processor, where the 48 kHz enhancement VAE plugs in;
without one, audio stays at the codec's rate.
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
                 use_cache: bool = True, system_prompt: str | None = None, batch_size: int = 16):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
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
        replies: list[Reply] = []
        for start in range(0, len(conversations), self.batch_size):
            chunk = range(start, min(start + self.batch_size, len(conversations)))
            requests = [self._request(conversations[i], mode, seeds[i]) for i in chunk]
            replies += [self._reply(result) for result in self.decoder.generate(requests, cfg)]
        return replies

    def text_to_audio(self, captions: Sequence[str], seeds: Sequence[int] | None = None,
                      cfg: GenerationConfig | None = None) -> list[Reply]:
        """TTA: one user turn per caption, audio forced."""
        for caption in captions:
            if not caption.strip():
                raise ValueError("an empty caption gives the model nothing to generate from")
        return self.reply([[("user", [c])] for c in captions], "audio", seeds, cfg)

    def _request(self, conversation: Sequence[ChatTurn], mode: Mode, seed: int) -> Request:
        if not self.listens and any(isinstance(p, AudioIn) for _, parts in conversation
                                                        for p in parts):
            raise ValueError("this model has no audio input (model.audio_in.enabled=false): it cannot listen")
        prompt, features = self.formatter.conversation_prompt(conversation)
        return Request(prompt=prompt, audio_features=features, mode=mode, seed=seed)

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
