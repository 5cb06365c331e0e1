"""UALMInference: replies decoded to audio through the codec and the post-processor hook; rich captions."""

from __future__ import annotations

import pytest
import torch

from ualm_nemo.data.rich_caption import RichCaption


@pytest.fixture(scope="module")
def infer_parts():
    from ualm_nemo.codec.xcodec import CodecTokenizer, build_tiny_xcodec
    from ualm_nemo.data.tokenizer import ByteChatTokenizer
    from ualm_nemo.model.config import AudioInputConfig, BACKBONES, UALMConfig
    from ualm_nemo.testing.hf_ualm import random_hf_ualm

    cfg = UALMConfig(backbone=BACKBONES["tiny"], audio_in=AudioInputConfig(random_encoder=True))
    model = random_hf_ualm(cfg, seed=1, std=0.05)
    return model, ByteChatTokenizer(), CodecTokenizer(build_tiny_xcodec(0))


def test_post_processor_gets_the_codec_audio(infer_parts):
    from ualm_nemo.inference.engine import GenerationConfig
    from ualm_nemo.inference.pipeline import UALMInference
    from ualm_nemo.inference.postprocess import SincResampler

    model, tok, codec = infer_parts
    cfg = GenerationConfig(min_frames=6, max_frames=6)
    plain = UALMInference(model, tok, codec).text_to_audio(["a beep"], [4], cfg)[0].audio[0]
    assert plain.sample_rate == 16000 and plain.wav.shape == (1, 6 * 320)
    assert torch.equal(plain.wav[0], codec.decode(plain.codes))
    up = UALMInference(model, tok, codec, postprocess=SincResampler(48000, 2)).text_to_audio(["a beep"], [4], cfg)
    audio = up[0].audio[0]
    assert torch.equal(audio.codes, plain.codes)  # the hook changes the audio delivered, not what was generated
    assert audio.sample_rate == 48000 and audio.wav.shape == (2, 3 * 6 * 320)
    assert torch.equal(audio.codec_wav, plain.wav[0])  # what the model hears back stays at the codec's rate
    # band-limited upsampling keeps the signal: every third sample is close to the original
    assert float((audio.wav[0, ::3] - plain.wav[0]).abs().max()) < 0.1 * float(plain.wav.abs().max()) + 1e-3
    with pytest.raises(ValueError, match="empty caption"):
        UALMInference(model, tok, codec).text_to_audio(["  "])


def test_replies_continue_as_conversation_turns(infer_parts):
    from ualm_nemo.data.formatting import AudioOut
    from ualm_nemo.inference.engine import GenerationConfig
    from ualm_nemo.inference.pipeline import UALMInference

    model, tok, codec = infer_parts
    infer = UALMInference(model, tok, codec, batch_size=2)
    cfg = GenerationConfig(min_frames=3, max_frames=5, max_text_tokens=4)
    replies = infer.reply([[("user", [c])] for c in ("a", "bb", "ccc")], "audio", [0, 1, 2], cfg)
    assert len(replies) == 3 and all(len(r.audio) == 1 for r in replies)  # two batches: 2 + 1
    role, parts = replies[0].as_turn()
    assert role == "assistant" and isinstance(parts[0], AudioOut)
    assert torch.equal(parts[0].codes, replies[0].audio[0].codes)
    follow = infer.reply([[("user", ["a"]), replies[0].as_turn(), ("user", ["describe it"])]], "text", [0], cfg)
    assert follow[0].text and not follow[0].audio
    with pytest.raises(ValueError, match="seeds"):
        infer.reply([[("user", ["a"])]], "text", [0, 1])


def test_rich_caption_round_trip():
    caption = RichCaption(("dog", "bark", "hall"), "0-2 s two barks; 2-4 s echo", "A dog barks twice in a hall.")
    text = caption.render()
    assert text.splitlines()[0] == "Keywords: dog, bark, hall"
    assert RichCaption.parse(text) == caption
    assert RichCaption.parse("Sure!\n" + text.replace("Layout", "layout")) == caption  # preamble, case
    partial = RichCaption.parse("Description: rain on a roof")
    assert partial == RichCaption((), "", "rain on a roof") and partial.as_caption() == "rain on a roof"
    assert RichCaption.parse("no fields here") is None


def test_the_context_rule_is_exact_and_checked_before_decoding(infer_parts):
    """prompt positions + reply budget == limit is taken, one more is refused; the model's own limit caps
    max_context; bad clips are refused by name; prompt_length is the prompt's real length."""
    from ualm_nemo.data.formatting import AudioIn, AudioOut
    from ualm_nemo.inference.engine import GenerationConfig
    from ualm_nemo.inference.pipeline import MIN_CLIP_SAMPLES, InputRejected, UALMInference

    model, tok, codec = infer_parts
    cfg = GenerationConfig(min_frames=2, max_frames=4, max_text_tokens=3)
    conversation = [("user", [AudioIn(torch.zeros(8000)), "\nwhat?"]),
                    ("assistant", [AudioOut(torch.zeros(3, 8, dtype=torch.long)), "ok"]), ("user", ["again"])]
    infer = UALMInference(model, tok, codec)
    positions = infer.formatter.prompt_length(conversation)
    assert positions == infer.prepare(conversation, "text", 0, cfg).prompt.shape[0]
    for mode, budget in (("text", 3), ("auto", 3 + 4 + 8 + 1)):
        assert UALMInference(model, tok, codec, max_context=positions + budget).prepare(conversation, mode, 0, cfg)
        with pytest.raises(InputRejected, match=f"{positions} positions \\+ a reply budget of {budget} exceed the "
                                                f"context limit of {positions + budget - 1}"):
            UALMInference(model, tok, codec, max_context=positions + budget - 1).prepare(conversation, mode, 0, cfg)
    assert UALMInference(model, tok, codec, max_context=10**9).max_context == 4096  # the tiny backbone's
    for clip, words in ((torch.full((MIN_CLIP_SAMPLES,), float("nan")), "NaN"),
                        (torch.zeros(MIN_CLIP_SAMPLES - 1), f"too short ({MIN_CLIP_SAMPLES - 1} samples")):
        with pytest.raises(InputRejected, match=words.replace("(", "\\(")) as err:
            infer.prepare([("user", ["hi", AudioIn(torch.zeros(800)), AudioIn(clip)])], "text", 0, cfg)
        assert err.value.what == "audio" and "audio input 2" in str(err.value)
    assert infer.prepare([("user", [AudioIn(torch.zeros(MIN_CLIP_SAMPLES))])], "text", 0, cfg)
