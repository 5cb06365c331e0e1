"""A random tiny HF Qwen2 folder, built offline from the tiny UALM config (conversion and command tests)."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_cfg(tp: int = 1, pp: int = 1):
    from ualm_nemo.model.config import AudioInputConfig, BACKBONES, UALMConfig

    cfg = UALMConfig(backbone=BACKBONES["tiny"], audio_in=AudioInputConfig(random_encoder=True))
    return cfg.with_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)


def make_hf_folder(path: Path, max_shard_size: str = "200KB") -> Path:
    """Random tiny Qwen2ForCausalLM (norms ~1, all else N(0, 0.1): a wrong map cannot pass) in several shards,
    plus stand-in tokenizer files (copied verbatim by the export; their content does not matter here)."""
    from transformers import Qwen2ForCausalLM

    from ualm_nemo.convert.qwen2_keymap import qwen2_config_for

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(qwen2_config_for(tiny_cfg()))
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(1.0 + 0.2 * torch.randn_like(param)) if "norm" in name else param.normal_(0.0, 0.1)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    (path / "tokenizer_config.json").write_text('{"model_max_length": 4096}\n')
    (path / "tokenizer.json").write_text('{"version": "1.0"}\n')
    return path


def write_byte_tokenizer(folder: Path) -> Path:
    """A real byte-level BPE tokenizer (the 256 byte symbols, no merges, Qwen's ChatML specials and end of text:
    259 ids, inside the tiny backbone's 384 text rows) saved as a transformers tokenizer folder, for tests that run
    text through ``AutoTokenizer`` (lm_eval, generate) on the tiny exported model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    vocab = {symbol: i for i, symbol in enumerate(sorted(byte_level.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    fast.save_pretrained(folder)
    return folder
