"""The decoding loop: batch == single == recompute, the model's modality choice, CFG rows, the delay grid.

The HF-side class here has random weights built from the tiny config (no export needed). The scripted backend
below stands in for a model with known preferences, so each transition of the state machine is checked
against exact expectations; every other test runs a real model.
"""

from __future__ import annotations

import math

import pytest
import torch

from ualm_nemo.data.formatting import AudioIn, AudioOut, SampleFormatter
from ualm_nemo.data.tokenizer import ByteChatTokenizer
from ualm_nemo.inference.engine import Decoder, GenerationConfig, Request
from ualm_nemo.inference.generate import decode, make_decoder
from ualm_nemo.inference.sampling import cfg_mix, sample_top_k
from ualm_nemo.model.config import AudioInputConfig, BACKBONES, UALMConfig
from ualm_nemo.model.delay_pattern import apply_delay


@pytest.fixture(scope="module")
def tiny():
    from ualm_nemo.testing.hf_ualm import random_hf_ualm

    cfg = UALMConfig(backbone=BACKBONES["tiny"], audio_in=AudioInputConfig(random_encoder=True))
    model = random_hf_ualm(cfg, seed=0, std=0.05)
    tok = ByteChatTokenizer()
    return model, tok, SampleFormatter(tok, cfg.vocab, cfg_dropout=0.0)


def test_cfg_mix_and_top_k():
    cond, uncond = torch.tensor([1.0, 3.0]), torch.tensor([2.0, 1.0])
    assert torch.equal(cfg_mix(cond, uncond, 3.0), torch.tensor([-1.0, 7.0]))
    assert torch.equal(cfg_mix(cond, uncond, 1.0), cond)
    draws = torch.rand(2000, generator=torch.Generator().manual_seed(0))
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0]]).repeat(2000, 1)
    picks = sample_top_k(logits, temperature=1.0, top_k=2, uniforms=draws)
    assert set(picks.tolist()) == {1, 2}  # only the top 2 ever sampled
    share = float((picks == 1).float().mean())  # softmax([5, 4]) gives token 1 a share of 0.731
    assert abs(share - 0.731) < 0.03
    assert torch.equal(sample_top_k(logits, 0.0, 2, draws), torch.ones(2000, dtype=torch.long))  # greedy
    assert int(sample_top_k(torch.tensor([0.0, 1.0, float("-inf")]), 1.0, 3, torch.tensor(0.9999))) != 2  # -inf never
    one = sample_top_k(logits[:1], 1.0, 2, draws[:1])  # a row alone picks what it picks in the batch
    assert torch.equal(one, picks[:1])


def _prefer_audio_start(model, prompt: torch.Tensor) -> None:
    """Point the <|audio_start|> head row along the final hidden state of ``prompt``: the model then opens an
    audio segment there (auto mode), as a trained model does for a caption."""
    with torch.no_grad():
        hidden = model.lm.model(inputs_embeds=model.embed(prompt[None])).last_hidden_state[0, -1]
        row = model.vocab.audio_start_id - model.vocab.text_vocab_size
        model.head_specials[row] = 50.0 * hidden / hidden.norm()


def _same(a, b) -> bool:
    return (a.stop == b.stop and [s.kind for s in a.segments] == [s.kind for s in b.segments]
            and a.text_ids == b.text_ids and all(torch.equal(x, y) for x, y in zip(a.audio, b.audio)))


def test_batch_equals_single_and_recompute(tiny):
    """Prompts of different lengths and every mode in one batch (audio input, an earlier assistant audio turn,
    an auto turn that opens audio then returns to text): each row as decoded alone, and as recomputed."""
    model, tok, fmt = tiny
    gen = torch.Generator().manual_seed(3)
    wav = torch.randn(16000, generator=gen) * 0.1
    history = torch.randint(0, 1024, (5, 8), generator=gen)
    conversations = [
        ([("user", ["a dog barks twice in a large hall"])], "audio"),
        ([("user", ["rain"])], "audio"),
        ([("user", [AudioIn(wav), "\nwhat is this sound?"])], "text"),
        ([("user", ["hi"]), ("assistant", ["here:", AudioOut(history)]), ("user", ["again"])], "auto"),
        ([("user", ["a long, vague prompt about the sea"])], "auto"),
    ]
    requests = []
    for k, (conv, mode) in enumerate(conversations):
        prompt, features = fmt.conversation_prompt(conv)
        requests.append(Request(prompt=prompt, audio_features=features, mode=mode, seed=10 + k))
    _prefer_audio_start(model, requests[4].prompt)
    cfg = GenerationConfig(max_frames=14, min_frames=3, max_text_tokens=6)
    batch = decode(model, tok, requests, cfg)
    assert [s.kind for s in batch[4].segments][:2] == ["audio", "text"]  # the model chose audio, then text
    assert batch[0].audio[0].shape[1] == 8 and 3 <= batch[0].audio[0].shape[0] <= 14
    assert not batch[2].audio and len(batch[2].text_ids) >= 1
    for request, got in zip(requests, batch):
        assert _same(got, decode(model, tok, [request], cfg)[0])
        assert _same(got, decode(model, tok, [request], cfg, use_cache=False)[0])
    again = decode(model, tok, requests[:2], cfg)
    assert all(_same(a, b) for a, b in zip(again, batch[:2]))  # seeded: reproducible
    other_seed = decode(model, tok, [Request(prompt=requests[0].prompt, mode="audio", seed=99)], cfg)[0]
    assert not torch.equal(other_seed.audio[0][:3], batch[0].audio[0][:3])


class ScriptedBackend:
    """Stands in for a model whose greedy text picks and audio codes are fixed by a script: stream-0 logits put
    the next scripted id on top; codebook logits put code ``(frame + n) % 1024`` on top of stream n. It records
    what every row was fed."""

    def __init__(self, vocab, text_script: list[int], audio_frames: int):
        self.vocab, self.text_script, self.audio_frames = vocab, list(text_script), audio_frames
        self.fed: list[torch.Tensor] = []
        self.rows = 0

    def _logits(self):
        v = self.vocab
        stream0 = torch.full((self.rows, v.size), -1e4)
        codebooks = torch.full((self.rows, v.num_codebooks - 1, v.codebook_span), -1e4)
        frame = sum(1 for ids in self.fed if int(ids[0, 0, 0]) >= v.audio_offset)  # grid rows fed so far
        last = int(self.fed[-1][0, 0, 0]) if self.fed else None
        if last is not None and (last == v.audio_start_id or last >= v.audio_offset):  # writing audio
            code0 = v.codebook_size if frame >= self.audio_frames else frame % 1024  # pad ends the audio
            stream0[:, v.codebook_start(0) + code0] = 10.0
            for n in range(1, v.num_codebooks):
                codebooks[:, n - 1, (frame + n) % 1024] = 10.0
        elif self.text_script:
            stream0[:, self.text_script.pop(0)] = 10.0
        return stream0, codebooks

    def prefill(self, prompts, audio_features, text=True):
        self.rows = len(prompts)
        return self._logits()

    def step(self, ids, text=True):
        self.fed.append(ids)
        return self._logits()

    def keep(self, rows):
        self.rows = len(rows)


def test_state_machine_text_audio_text_and_cfg_rows():
    v = UALMConfig(backbone=BACKBONES["tiny"]).vocab
    im_end, frames = 7, 4
    script = [65, 66, v.audio_start_id, 67, im_end]  # "AB", then audio, then "C", then the end of the turn
    backend = ScriptedBackend(v, script, frames)
    decoder = Decoder(lambda rows, length: backend, v, num_text_ids=259, stop_ids=[im_end])
    prompt = torch.tensor([v.text_position_streams(1)] * 3)
    result = decoder.generate([Request(prompt=prompt, mode="auto")], GenerationConfig(temperature=0.0))[0]
    assert [s.kind for s in result.segments] == ["text", "audio", "text"] and result.stop == "end"
    assert result.segments[0].text_ids == [65, 66] and result.segments[2].text_ids == [67]
    # stream n's code at grid row j is j + n; codes[f, n] = grid[f + n, n]
    expected = torch.tensor([[f + 2 * n for n in range(8)] for f in range(frames)])
    assert torch.equal(result.audio[0], expected)
    cond = torch.stack([ids[0, 0] for ids in backend.fed])  # [steps, 8]
    uncond = torch.stack([ids[1, 0] for ids in backend.fed])
    grid = v.codes_to_ids(apply_delay(expected, v.codebook_size))  # the forced pads of the delay pattern
    start = 2  # "A", "B" fed first
    assert int(cond[start, 0]) == v.audio_start_id
    assert torch.equal(cond[start + 1: start + 1 + grid.shape[0]], grid)
    assert int(cond[start + 1 + grid.shape[0], 0]) == v.audio_end_id
    # the unconditional row: pads at text positions, the audio segment itself mirrored
    pad = torch.tensor(v.text_position_streams(v.pad_id))
    audio_span = slice(start, start + grid.shape[0] + 2)
    assert torch.equal(uncond[audio_span], cond[audio_span])
    outside = torch.cat([uncond[:start], uncond[audio_span.stop:]])
    assert bool((outside == pad).all())


def test_forced_modes_and_budgets(tiny):
    model, tok, fmt = tiny
    prompt = fmt.conversation_prompt([("user", ["beep"])])[0]
    _prefer_audio_start(model, prompt)
    text = decode(model, tok, [Request(prompt=prompt, mode="text")], GenerationConfig(max_text_tokens=4))[0]
    assert not text.audio and len(text.text_ids) <= 4  # audio never opened although the model prefers it
    assert all(i < tok.vocab_size for i in text.text_ids)
    audio = decode(model, tok, [Request(prompt=prompt, mode="audio")], GenerationConfig(min_frames=5, max_frames=5))[0]
    assert [s.kind for s in audio.segments] == ["audio"] and audio.audio[0].shape == (5, 8)
    no_audio = decode(model, tok, [Request(prompt=prompt, mode="auto")],
                      GenerationConfig(max_audio_segments=0, max_text_tokens=3))[0]
    assert not no_audio.audio


@pytest.mark.parametrize("key,value", [("cfg_scale", 0.0), ("cfg_scale", -5.0), ("cfg_scale", math.nan),
                                       ("cfg_scale", math.inf), ("max_frames", 0), ("temperature", math.nan),
                                       ("min_frames", 0), ("max_text_tokens", 0)])
def test_bad_generation_settings_name_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        GenerationConfig(**{key: value})
    with pytest.raises(ValueError, match="min_frames"):
        GenerationConfig(min_frames=9, max_frames=8)


def test_bad_conversations_are_refused(tiny):
    model, tok, fmt = tiny
    with pytest.raises(ValueError, match="user turn"):
        fmt.conversation_prompt([("system", ["be brief"])])
    with pytest.raises(ValueError, match="ends with an assistant"):
        fmt.conversation_prompt([("user", ["hi"]), ("assistant", ["hello"])])
    with pytest.raises(ValueError, match="NaN"):
        fmt.conversation_prompt([("user", [AudioIn(torch.full((16000,), math.nan))])])
    with pytest.raises(ValueError, match="cannot hold"):
        fmt.conversation_prompt([("user", [AudioOut(torch.zeros(3, 8, dtype=torch.long))])])
    with pytest.raises(ValueError, match="mode"):
        Request(prompt=torch.zeros(2, 8, dtype=torch.long), mode="speech")
    decoder = make_decoder(model, tok.vocab_size, [tok.im_end_id])
    assert decoder.generate([]) == []
