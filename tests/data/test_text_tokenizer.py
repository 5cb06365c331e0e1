"""Text tokenizers: byte tokenizer round trip and specials; HF wrapper over a tiny locally-built BPE folder."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from ualm_nemo.data.tokenizer import (ENDOFTEXT, IM_END, IM_START, ByteChatTokenizer, HFTokenizer, TextTokenizer,
                                      build_tokenizer)
from ualm_nemo.model.config import BACKBONES


def test_byte_round_trip_and_specials():
    tok = build_tokenizer("byte")
    assert isinstance(tok, ByteChatTokenizer) and isinstance(tok, TextTokenizer)
    assert tok.vocab_size == 259 <= BACKBONES["tiny"].text_vocab_size
    text = "a low hum, 3 + 4 = 7 — ünïcode ✓\n"
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    assert (tok.endoftext_id, tok.im_start_id, tok.im_end_id) == (256, 257, 258)
    assert tok.eos_ids == (258, 256)
    assert tok.decode([tok.im_start_id, *tok.encode("user\nhi"), tok.im_end_id]) == f"{IM_START}user\nhi{IM_END}"
    assert tok.encode(IM_END) == list(IM_END.encode())  # special strings in text stay text


def test_byte_decode_rejects_foreign_ids():
    with pytest.raises(ValueError):
        ByteChatTokenizer().decode([400])


def _tiny_hf_folder(path) -> None:
    """A byte-level BPE with Qwen's three ChatML specials, saved as a transformers tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[ENDOFTEXT, IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["a low hum", "a high beep", "what do you hear?", "user assistant"] * 10, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END).save_pretrained(str(path))


def test_hf_tokenizer_from_local_folder(tmp_path):
    _tiny_hf_folder(tmp_path)
    tok = build_tokenizer(str(tmp_path))
    assert isinstance(tok, HFTokenizer) and isinstance(tok, TextTokenizer)
    assert (tok.im_start_id, tok.im_end_id) == (1, 2)
    assert tok.eos_ids == (2, 0)
    text = "a low hum\nwhat do you hear?"
    assert tok.decode(tok.encode(text)) == text
    assert tok.im_end_id not in tok.encode(f"x{IM_END}y")  # specials are never parsed out of text
    assert tok.vocab_size <= 300


def test_formatter_builds_chatml_from_hf_ids(tmp_path):
    from ualm_nemo.data.formatting import SampleFormatter
    from ualm_nemo.model.vocab import UnifiedVocab

    _tiny_hf_folder(tmp_path)
    tok = HFTokenizer(tmp_path)
    sample = SampleFormatter(tok, UnifiedVocab(384)).format_text((("user", "what do you hear?"),
                                                                 ("assistant", "a low hum")))
    ids = sample["tokens"][:, 0].tolist()
    assert ids[0] == tok.im_start_id and ids.count(tok.im_end_id) == 2
    assert tok.decode(ids) == f"{IM_START}user\nwhat do you hear?{IM_END}\n{IM_START}assistant\na low hum{IM_END}\n"


def test_hf_tokenizer_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer folder"):
        build_tokenizer(str(tmp_path / "nope"))
