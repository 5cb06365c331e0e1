"""UALM-Reason modes as pipelines over ``UALMInference``: enrichment, dialogue, self-reflection.

Each mode is one growing conversation, so the model sees its own earlier steps exactly as multi-turn SFT
data presents them (the instructions below are the templates that data uses; rich captions are rendered by
``data/rich_caption.py``). They run with any checkpoint; a post-trained one makes them good.

* **enrichment**: vague prompt -> the model writes a rich caption (Keywords / Layout / Description) -> audio;
* **dialogue**: multi-turn; the model answers each user turn as it chooses (text, e.g. a clarifying question,
  or audio);
* **self-reflection**: plan (rich caption) -> audio -> the audio is fed back as input ("listen") -> the model
  writes a rich caption of what it actually made -> a critique comparing plan and result -> refined audio.

Every function takes a batch of prompts and runs each step for the whole batch at once.
"""

from __future__ import annotations

from typing import Sequence

from ualm_nemo.data.formatting import AudioIn, ChatTurn
from ualm_nemo.inference.engine import GenerationConfig
from ualm_nemo.inference.pipeline import InputRejected, Reply, UALMInference
from ualm_nemo.inference.transcript import Step, Transcript

ENRICH = ("Turn this request into a rich caption of the audio to make, with Keywords, Layout and Description:\n"
          "{prompt}")
GENERATE = "Generate the audio."
LISTEN = "Listen to the audio you generated and describe it as a rich caption with Keywords, Layout and Description."
CRITIQUE = "Compare what you generated with your plan. List what differs and what must change."
REFINE = "Generate a refined audio that fixes these differences."


def _step(infer: UALMInference, conversations: list[list[ChatTurn]], transcripts: list[Transcript],
          users: Sequence[str], name: str, mode: str, seeds: Sequence[int], cfg: GenerationConfig | None,
          listen_to: list[Reply] | None = None) -> list[Reply]:
    """Add a user turn to every conversation (the audio of ``listen_to``'s replies as its input, when given),
    decode the assistant's turn for all of them at once, and record both in the transcripts."""
    for k, (conversation, transcript) in enumerate(zip(conversations, transcripts)):
        parts: list = []
        heard = listen_to[k].audio if listen_to is not None else []
        if listen_to is not None:
            if not heard or any(a.codec_wav is None for a in heard):
                raise ValueError(f"step {name!r} listens to the generated audio, but none was decoded "
                                 "(give UALMInference a codec)")
            parts += [AudioIn(a.codec_wav) for a in heard] + ["\n"]
        conversation.append(("user", parts + [users[k]]))
        transcript.add(Step("user", name, users[k], audio=list(heard)))  # the clip the model listens to
    replies = infer.reply(conversations, mode, seeds, cfg)
    for conversation, transcript, reply in zip(conversations, transcripts, replies):
        conversation.append(reply.as_turn())
        transcript.add(Step.from_reply(name, reply))
    return replies


def _enrich(infer: UALMInference, prompts: Sequence[str], seeds: Sequence[int] | None,
            cfg: GenerationConfig | None, mode: str):
    for p in prompts:
        if not p.strip():
            raise ValueError("an empty prompt gives the model nothing to work from")
    seeds = list(seeds) if seeds is not None else list(range(len(prompts)))
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    conversations: list[list[ChatTurn]] = [[] for _ in prompts]
    transcripts = [Transcript(mode, meta={"prompt": p, "seed": s}) for p, s in zip(prompts, seeds)]
    _step(infer, conversations, transcripts, [ENRICH.format(prompt=p) for p in prompts], "plan", "text", seeds, cfg)
    audio = _step(infer, conversations, transcripts, [GENERATE] * len(prompts), "audio", "audio", seeds, cfg)
    return conversations, transcripts, seeds, audio


def enrich(infer: UALMInference, prompts: Sequence[str], seeds: Sequence[int] | None = None,
           cfg: GenerationConfig | None = None) -> list[Transcript]:
    """Vague prompts -> rich captions -> audio."""
    return _enrich(infer, prompts, seeds, cfg, "enrichment")[1]


def self_reflect(infer: UALMInference, prompts: Sequence[str], seeds: Sequence[int] | None = None,
                 cfg: GenerationConfig | None = None) -> list[Transcript]:
    """Plan -> audio -> listen -> rich caption of the result -> critique -> refined audio."""
    if not infer.listens:
        raise ValueError("self-reflection listens to its own audio: this model has no audio input "
                         "(model.audio_in.enabled=false)")
    conversations, transcripts, seeds, audio = _enrich(infer, prompts, seeds, cfg, "self-reflection")
    n = len(prompts)
    _step(infer, conversations, transcripts, [LISTEN] * n, "listen", "text", seeds, cfg, listen_to=audio)
    _step(infer, conversations, transcripts, [CRITIQUE] * n, "critique", "text", seeds, cfg)
    _step(infer, conversations, transcripts, [REFINE] * n, "refined audio", "audio", [s + 1 for s in seeds], cfg)
    return transcripts


class Dialogue:
    """A multi-turn conversation: each :meth:`say` adds the user's turn and returns the model's reply, which may
    be a question back (text) or audio, as the model chooses."""

    def __init__(self, infer: UALMInference, seed: int = 0, cfg: GenerationConfig | None = None,
                 system_prompt: str | None = None):
        self.infer, self.seed, self.cfg = infer, seed, cfg
        self.conversation: list[ChatTurn] = [("system", [system_prompt])] if system_prompt else []
        self.transcript = Transcript("dialogue")

    def say(self, text: str, audio: Sequence[tuple[str, AudioIn]] = ()) -> Reply:
        """``audio``: (file name, clip) pairs the user attaches to this turn. A turn the model cannot take (empty,
        a bad clip, over the context limit) raises InputRejected and leaves the dialogue as it was."""
        if not text.strip() and not audio:
            raise InputRejected("prompt", "an empty turn: say something or attach audio")
        parts = [clip for _, clip in audio] + ([("\n" if audio else "") + text] if text else [])
        conversation = [*self.conversation, ("user", parts)]
        seed = self.seed + len(self.transcript.steps) + 1
        request = self.infer.prepare(conversation, "auto", seed, self.cfg)
        self.conversation = conversation
        self.transcript.add(Step("user", f"turn {len(self.transcript.steps) // 2 + 1}", text,
                                 audio_paths=[name for name, _ in audio]))
        reply = self.infer.decode([request], self.cfg)[0]
        self.conversation.append(reply.as_turn())
        self.transcript.add(Step.from_reply(self.transcript.steps[-1].name, reply))
        return reply
