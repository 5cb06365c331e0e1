"""The decoding loop: many conversations at once, each assistant turn written as the model chooses.

Every request is one row of the batch (its prompt left-padded to the longest); a request that may produce
audio also has an unconditional row for classifier-free guidance. Each step, every row feeds one position and
reads the logits at it; each request then moves its own state machine:

* **text**: greedy over the text ids, ``<|im_end|>`` (the turn ends) and, unless text is forced,
  ``<|audio_start|>`` (the model chooses to answer in audio);
* **audio**: the delayed grid, frame by frame, with CFG, temperature and top-k over each codebook. At grid
  frame ``j`` stream ``n`` is forced to its pad while ``j < n`` (the delay's leading pads) and once
  ``j >= F + n`` (trailing pads), where ``F`` is the frame at which stream 0 emits its pad (the audio's end);
  the forced grid comes from ``model/delay_pattern.py``. After the grid, ``<|audio_end|>`` is forced and the
  turn goes back to text (or ends, when audio is forced: text-to-audio).

The unconditional row mirrors its request as training's condition dropout writes it: ``<|pad|>`` at every text
and audio-input position, the audio segment itself (``<|audio_start|>``, grid, ``<|audio_end|>``) unchanged.

Sampling draws from one CPU generator per request, seeded by the request, in the same calls whatever the
batch: a request decodes to the same codes and text alone or in any batch. A finished turn's rows leave the
batch (``DecodeBackend.keep``), so a long clip does not make the others pay for its length.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import torch

from ualm_nemo.inference.backends import DecodeBackend
from ualm_nemo.inference.sampling import cfg_mix, sample_top_k
from ualm_nemo.model.delay_pattern import delay_pad_mask, revert_delay
from ualm_nemo.model.vocab import UnifiedVocab

Mode = Literal["auto", "audio", "text"]
MODES = ("auto", "audio", "text")


class GenerationSettingError(ValueError):
    """A generation setting out of range; ``key`` names it (commands map it to their flag)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


@dataclass(kw_only=True)
class GenerationConfig:
    """Paper defaults: cfg 3, temperature 0.8, top-k 20, at most 1024 frames (20.5 s at 50 Hz); text greedy."""

    cfg_scale: float = 3.0
    temperature: float = 0.8
    top_k: int = 20
    max_frames: int = 1024
    min_frames: int = 1
    max_text_tokens: int = 256
    max_audio_segments: int = 1

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            key, rule = problems[0]
            raise GenerationSettingError(key, f"invalid generation setting {key}={getattr(self, key)!r}: {rule}")

    def problems(self) -> list[tuple[str, str]]:
        """(key, rule) for every setting out of range."""
        finite = lambda x: x == x and abs(x) != float("inf")  # noqa: E731
        rules = [("cfg_scale", finite(self.cfg_scale) and self.cfg_scale > 0, "must be finite and > 0"),
                 ("temperature", finite(self.temperature) and self.temperature >= 0,
                  "must be finite and >= 0 (0: greedy)"),
                 ("top_k", self.top_k >= 0, "must be >= 0 (0: no top-k cut)"),
                 ("max_frames", self.max_frames >= 1, "must be >= 1"),
                 ("min_frames", 1 <= self.min_frames <= self.max_frames,
                  f"must lie between 1 and max_frames ({self.max_frames})"),
                 ("max_text_tokens", self.max_text_tokens >= 1, "must be >= 1"),
                 ("max_audio_segments", self.max_audio_segments >= 0, "must be >= 0")]
        return [(key, rule) for key, ok, rule in rules if not ok]

    def max_new_positions(self, num_streams: int) -> int:
        """Upper bound of the positions one turn adds (sizes static KV caches): text, and per audio segment
        ``<|audio_start|>``, the delayed grid and ``<|audio_end|>``."""
        return self.max_text_tokens + self.max_audio_segments * (self.max_frames + num_streams + 1)


@dataclass
class Request:
    """One assistant turn to decode.

    prompt [L, N]: the conversation through ``<|im_start|>assistant\\n`` (formatting.SampleFormatter
    .conversation_prompt); audio_features: log-mel [n_mel, frames] of each audio input, in placeholder order.
    """

    prompt: torch.Tensor
    audio_features: list[torch.Tensor] = field(default_factory=list)
    mode: Mode = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}: expected one of {MODES}")
        if self.prompt.dim() != 2 or self.prompt.shape[0] == 0:
            raise ValueError(f"prompt must be [L >= 1, N], got {tuple(self.prompt.shape)}")


@dataclass
class Segment:
    """A piece of the assistant turn: text ids, or audio codes [F, N]."""

    kind: Literal["text", "audio"]
    text_ids: list[int] = field(default_factory=list)
    codes: torch.Tensor | None = None


@dataclass
class Result:
    segments: list[Segment]
    stop: Literal["end", "length"]  # "end": the model closed the turn; "length": max_text_tokens reached

    @property
    def text_ids(self) -> list[int]:
        return [i for s in self.segments if s.kind == "text" for i in s.text_ids]

    @property
    def audio(self) -> list[torch.Tensor]:
        return [s.codes for s in self.segments if s.kind == "audio"]


class _Turn:
    """The state machine of one request (see the module docstring)."""

    def __init__(self, request: Request, vocab: UnifiedVocab, cfg: GenerationConfig):
        self.vocab, self.cfg, self.mode = vocab, cfg, request.mode
        self.generator = torch.Generator().manual_seed(request.seed)
        self.segments: list[Segment] = []
        self.text_count = 0
        self.audio_count = 0
        self.done: str | None = None
        self.pending: list[torch.Tensor] = []  # forced positions [N] still to feed, logits ignored meanwhile
        self.grid: list[torch.Tensor] | None = None  # delayed codes [N] of the audio being written
        self.end: int | None = None
        if request.mode == "audio":
            self._start_audio()

    @property
    def in_audio(self) -> bool:
        return self.grid is not None

    def _text_row(self, text_id: int) -> torch.Tensor:
        return torch.tensor(self.vocab.text_position_streams(text_id))

    def _start_audio(self) -> None:
        self.grid, self.end = [], None
        self.audio_count += 1

    def choose_text(self, next_id: int, stop_ids: set[int]) -> torch.Tensor | None:
        """The greedy pick at a text position -> the row to feed (None: the turn is over)."""
        if next_id in stop_ids:
            self.done = "end"
            return None
        if next_id == self.vocab.audio_start_id:
            self._start_audio()
            return self._text_row(next_id)
        if not self.segments or self.segments[-1].kind != "text":
            self.segments.append(Segment("text"))
        self.segments[-1].text_ids.append(next_id)
        self.text_count += 1
        if self.text_count >= self.cfg.max_text_tokens:
            self.done = "length"
        return self._text_row(next_id)

    def mask_audio(self, mixed: torch.Tensor) -> None:
        """mixed [N, span] CFG logits at grid frame j: rule out (in place) what this frame may not sample."""
        cfg, pad = self.cfg, self.vocab.codebook_size
        j = len(self.grid)
        if self.end is None:  # stream 0 may end the audio (not before min_frames, forced at max_frames)
            if j < cfg.min_frames:
                mixed[0, pad] = float("-inf")
            if j >= cfg.max_frames:
                mixed[0, :pad] = float("-inf")
        mixed[1:, pad] = float("-inf")  # streams >= 1 never choose pad by themselves: pads are forced below

    def uniforms(self) -> torch.Tensor:
        """[N] draws of this request's generator for the next frame (none when decoding greedily)."""
        if self.cfg.temperature <= 0:
            return torch.zeros(self.vocab.num_codebooks)
        return torch.rand(self.vocab.num_codebooks, generator=self.generator)

    def accept_audio(self, codes: torch.Tensor) -> torch.Tensor:
        """Sampled codes [N] at grid frame j -> the grid row to feed (unified ids [N]), the delay's pads forced."""
        n_streams, pad = self.vocab.num_codebooks, self.vocab.codebook_size
        j = len(self.grid)
        if self.end is None and int(codes[0]) == pad:
            self.end = j
        codes = torch.where(delay_pad_mask(j, self.end, n_streams), torch.full_like(codes, pad), codes)
        self.grid.append(codes)
        if self.end is not None and len(self.grid) >= self.end + n_streams - 1:
            self._finish_audio()
        return self.vocab.codes_to_ids(codes)

    def _finish_audio(self) -> None:
        codes = revert_delay(torch.stack(self.grid))  # [F, N]
        self.segments.append(Segment("audio", codes=codes))
        self.grid = None
        if self.mode == "audio":  # text-to-audio: the turn is the audio
            self.done = "end"
        else:
            self.pending.append(self._text_row(self.vocab.audio_end_id))

    def result(self) -> Result:
        return Result(self.segments, self.done or "length")


class Decoder:
    """Batched decoding over a :class:`DecodeBackend` (the HF-side class or the Megatron model)."""

    def __init__(self, backend_factory: Callable[[int, int], DecodeBackend], vocab: UnifiedVocab, num_text_ids: int,
                 stop_ids: Sequence[int]):
        """backend_factory(rows, max_length) -> a fresh backend; num_text_ids: the tokenizer's id count (the
        embedding's padding rows are not text); stop_ids: ids that close the turn (``<|im_end|>``, eos)."""
        self.backend_factory, self.vocab = backend_factory, vocab
        self.num_text_ids, self.stop_ids = num_text_ids, set(stop_ids)

    def _allowed(self, audio: bool, device: torch.device) -> torch.Tensor:
        """[V] True where a text position may pick the id."""
        allowed = torch.zeros(self.vocab.size, dtype=torch.bool, device=device)
        allowed[: self.num_text_ids] = True
        allowed[list(self.stop_ids)] = True
        if audio:
            allowed[self.vocab.audio_start_id] = True
        return allowed

    @torch.no_grad()
    def generate(self, requests: Sequence[Request], cfg: GenerationConfig | None = None) -> list[Result]:
        """Decode every request's assistant turn in one batch."""
        cfg = cfg or GenerationConfig()
        if not requests:
            return []
        v = self.vocab
        turns = [_Turn(r, v, cfg) for r in requests]
        rows, clips, uncond_row, owner = self._layout(requests)
        pad_row = self._row(v.pad_id)
        longest = max(p.shape[0] for p in rows)
        backend = self.backend_factory(len(rows), longest + cfg.max_new_positions(v.num_codebooks))
        stream0, codebooks = backend.prefill(rows, clips, text=any(r.mode != "audio" for r in requests))
        live = list(range(len(rows)))  # logical rows still in the batch, in slot order
        slot = {r: r for r in live}
        allowed = torch.stack([self._allowed(a, stream0.device) for a in (False, True)])  # [2, V]: audio allowed?
        while True:
            feed: dict[int, torch.Tensor] = {}
            text_rows, audio_rows = [], []
            for i, turn in enumerate(turns):
                if turn.done:
                    continue
                if turn.pending:  # forced positions: the logits are not needed
                    feed[i] = turn.pending.pop(0)
                else:
                    (audio_rows if turn.in_audio else text_rows).append(i)
            if audio_rows:
                feed.update(self._audio_step(turns, audio_rows, slot, uncond_row, stream0, codebooks, cfg))
            if text_rows:
                feed.update(self._text_step(turns, text_rows, slot, stream0, allowed, cfg))
            for i in [i for i in feed if i in uncond_row]:  # the unconditional row mirrors the audio positions
                if self._is_audio_position(feed[i]):
                    feed[uncond_row[i]] = feed[i]
            if all(t.done for t in turns):
                break
            still = [r for r in live if not turns[owner[r]].done]
            if len(still) < len(live):  # finished turns leave the batch
                backend.keep(torch.tensor([slot[r] for r in still]))
                live, slot = still, {r: k for k, r in enumerate(still)}
            need_text = any(not t.done and not t.in_audio and not t.pending for t in turns)
            stream0, codebooks = backend.step(torch.stack([feed.get(r, pad_row) for r in live])[:, None],
                                              text=need_text)
        return [t.result() for t in turns]

    def _layout(self, requests: Sequence[Request]):
        """Logical rows: request i -> row i (its prompt; ``<|audio_start|>`` appended when audio is forced), then
        an unconditional row per request that may write audio (pads, same length). -> (prompts, each row's
        audio clips, {request: its unconditional row}, each row's request)."""
        v = self.vocab
        start = self._row(v.audio_start_id)[None]
        prompts = [r.prompt if r.mode != "audio" else torch.cat([r.prompt, start]) for r in requests]
        guided = [i for i, r in enumerate(requests) if r.mode != "text"]
        uncond = []
        for i in guided:
            rows = self._row(v.pad_id).expand(prompts[i].shape[0], -1).clone()
            if requests[i].mode == "audio":
                rows[-1] = start[0]
            uncond.append(rows)
        clips = [r.audio_features for r in requests] + [[] for _ in guided]
        uncond_row = {i: len(requests) + k for k, i in enumerate(guided)}
        return prompts + uncond, clips, uncond_row, list(range(len(requests))) + guided

    def _text_step(self, turns: list[_Turn], rows: list[int], slot: dict[int, int], stream0: torch.Tensor,
                   allowed: torch.Tensor, cfg: GenerationConfig) -> dict[int, torch.Tensor]:
        """Greedy picks of every request at a text position, in one masked argmax -> {request: row to feed}."""
        may_audio = [turns[i].mode == "auto" and turns[i].audio_count < cfg.max_audio_segments for i in rows]
        index = torch.tensor([slot[i] for i in rows], device=stream0.device)
        allow = allowed[index.new_tensor(may_audio, dtype=torch.long)]  # [T, V]
        picks = stream0[index].masked_fill(~allow, float("-inf")).argmax(-1).tolist()  # one sync for the batch
        feed = {}
        for i, pick in zip(rows, picks):
            ids = turns[i].choose_text(pick, self.stop_ids)
            if ids is not None:
                feed[i] = ids
        return feed

    def _audio_step(self, turns: list[_Turn], rows: list[int], slot: dict[int, int], uncond_row: dict[int, int],
                    stream0: torch.Tensor, codebooks: torch.Tensor, cfg: GenerationConfig) -> dict[int, torch.Tensor]:
        """One grid frame for every request writing audio: CFG mix, each request's rules, one batched sampling
        from each request's own draws -> {request: grid row to feed}."""
        v = self.vocab
        cond = torch.tensor([slot[i] for i in rows], device=stream0.device)
        uncond = torch.tensor([slot[uncond_row[i]] for i in rows], device=stream0.device)
        cb0 = stream0[:, v.codebook_start(0): v.codebook_start(0) + v.codebook_span]
        logits = torch.cat([cb0.unsqueeze(1), codebooks], dim=1).float()  # [R, N, span]
        mixed = cfg_mix(logits[cond], logits[uncond], cfg.cfg_scale).cpu()  # [A, N, span]
        for k, i in enumerate(rows):
            turns[i].mask_audio(mixed[k])
        uniforms = torch.stack([turns[i].uniforms() for i in rows])  # [A, N]
        codes = sample_top_k(mixed, cfg.temperature, cfg.top_k, uniforms)  # [A, N]
        return {i: turns[i].accept_audio(codes[k]) for k, i in enumerate(rows)}

    def _row(self, text_id: int) -> torch.Tensor:
        return torch.tensor(self.vocab.text_position_streams(text_id))

    def _is_audio_position(self, ids: torch.Tensor) -> bool:
        """The audio segment's own positions (kept in the unconditional row): start, grid, end."""
        first = int(ids[0])
        return first in (self.vocab.audio_start_id, self.vocab.audio_end_id) or first >= self.vocab.audio_offset
