"""Text tokenizers: one small Protocol, a byte-level tokenizer for the tiny model, and a local-folder HF wrapper.

The data side only needs ``encode``/``decode`` of plain text and the ids of the ChatML specials; the unified
vocabulary (model/vocab.py) then puts the UALM specials and codec ids *after* ``text_vocab_size``. So the only
constraint a tokenizer places on the model is ``vocab_size <= text_vocab_size`` (checked by the formatter).

``encode`` never parses special-token strings out of text: the ChatML scaffold is built from ids
(``im_start_id``/``im_end_id``), so a caption that happens to contain ``<|im_end|>`` cannot break a sample.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"


@runtime_checkable
class TextTokenizer(Protocol):
    """What the formatter and the generator need from a text tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def im_start_id(self) -> int: ...

    @property
    def im_end_id(self) -> int: ...

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Ids that end generation of a text turn (``<|im_end|>`` and ``<|endoftext|>``)."""
        ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteChatTokenizer:
    """UTF-8 bytes 0..255 plus the three Qwen ChatML specials (259 ids): no files, fits the tiny model (384 rows).

    Special ids follow Qwen's order (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``) so swapping in the
    real tokenizer changes numbers, not structure.
    """

    _SPECIALS = (ENDOFTEXT, IM_START, IM_END)

    @property
    def vocab_size(self) -> int:
        return 256 + len(self._SPECIALS)

    @property
    def endoftext_id(self) -> int:
        return 256

    @property
    def im_start_id(self) -> int:
        return 257

    @property
    def im_end_id(self) -> int:
        return 258

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return (self.im_end_id, self.endoftext_id)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Bytes decode leniently (a generated id run may cut a UTF-8 sequence); specials print as their names."""
        out: list[str] = []
        buf = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                buf.append(i)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf.clear()
            if 256 <= i < self.vocab_size:
                out.append(self._SPECIALS[i - 256])
            else:
                raise ValueError(f"id {i} is outside the byte tokenizer's {self.vocab_size} ids")
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the symbols of a byte-level BPE vocabulary)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b if b in printable else next(extra)) for b in range(256)}


def save_byte_tokenizer(folder: str | Path) -> Path:
    """Write ``ByteChatTokenizer`` as a transformers tokenizer folder with the same ids (byte b -> b, then
    ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` -> 256, 257, 258) and a ChatML chat template: what an export
    of a ``data.tokenizer=byte`` run carries, so ``AutoTokenizer`` (lm_eval, ``evaluate.py text``) reads it."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(vocab={c: b for b, c in _bytes_to_unicode().items()}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ByteChatTokenizer._SPECIALS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=ENDOFTEXT, pad_token=ENDOFTEXT,
                                   additional_special_tokens=[IM_START, IM_END])
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    fast.save_pretrained(str(folder))
    # beside a Qwen2 config.json AutoTokenizer picks Qwen2's class, whose default unk is <|endoftext|>: none, as
    # Qwen2.5's own tokenizer_config says
    config_file = Path(folder) / "tokenizer_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "unk_token": None}, indent=2) + "\n")
    return Path(folder)


class HFTokenizer:
    """``transformers.AutoTokenizer`` from a local folder (Qwen2.5's tokenizer files); never touches the hub."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer folder {str(path)!r} does not exist: pass a local folder holding "
                                    "tokenizer.json / tokenizer_config.json (e.g. a Qwen2.5 checkpoint), or 'byte'")
        from transformers import AutoTokenizer  # heavy import, only when a real tokenizer is asked for

        self._tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self._im_start = self._special(IM_START)
        self._im_end = self._special(IM_END)
        self._eos = tuple(dict.fromkeys(i for i in (self._im_end, self._optional(ENDOFTEXT)) if i is not None))

    def _optional(self, token: str) -> int | None:
        i = self._tok.convert_tokens_to_ids(token)
        return None if i is None or i == self._tok.unk_token_id else int(i)

    def _special(self, token: str) -> int:
        i = self._optional(token)
        if i is None:
            raise ValueError(f"tokenizer has no {token!r} token: UALM uses the Qwen ChatML template")
        return i

    @property
    def vocab_size(self) -> int:
        return len(self._tok)  # includes added specials, unlike tokenizer.vocab_size

    @property
    def im_start_id(self) -> int:
        return self._im_start

    @property
    def im_end_id(self) -> int:
        return self._im_end

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return self._eos

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False, split_special_tokens=True))

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def build_tokenizer(spec: str | Path) -> TextTokenizer:
    """``"byte"`` -> ByteChatTokenizer; anything else is a local tokenizer folder."""
    if str(spec) == "byte":
        return ByteChatTokenizer()
    return HFTokenizer(spec)
