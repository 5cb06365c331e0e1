"""UALM on plain transformers, loaded from an exported HF folder alone (no Megatron, no process groups).

``UALMForConditionalGeneration`` = ``transformers.Qwen2ForCausalLM`` (the folder's config.json + safetensors)
+ the parts in ``audio.safetensors`` (see audio_parts.py) + the audio encoder folder. Its math is that of
ualm_nemo/model at TP1, computed with the single-device reference functions of model/stream_math.py:

* input: tokens [b, s, N] -> sum over streams of the stream's row (pads embed to zero) -> [b, s, h];
  ``<|audio_in|>`` positions overwritten by encoder + adapter outputs;
* stream 0: h @ [lm_head | head.specials | head.audio]^T -> [b, s, vocab] (unified-id order);
* streams 1..N-1: (h + e_n) @ head.audio[codebook n]^T (shared) or h @ codebook_heads[n] (per_codebook)
  -> [b, s, N-1, 1025].

Decoding (inference/engine.py) steps it through :meth:`decode` (KV cache: each step feeds only the new
positions) via ``backends.HFBackend``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ualm_nemo.convert.audio_parts import AUDIO_FILE, UALM_CONFIG_FILE, expected_audio_shapes
from ualm_nemo.model.config import UALMConfig
from ualm_nemo.model.stream_math import IdTable, codebook_logits, embed_streams, shared_codebook_rows, stream0_logits


class UALMForConditionalGeneration(nn.Module):
    def __init__(self, cfg: UALMConfig, lm: nn.Module, parts: dict[str, torch.Tensor],
                 audio_input: nn.Module | None = None) -> None:
        super().__init__()
        self.cfg, self.vocab = cfg, cfg.vocab
        self.lm = lm  # transformers Qwen2ForCausalLM: .model (decoder), .lm_head (text rows of the head)
        self.embedding_specials = nn.Parameter(parts["embedding.specials"], requires_grad=False)
        self.embedding_audio = nn.Parameter(parts["embedding.audio"], requires_grad=False)
        self.head_specials = nn.Parameter(parts["head.specials"], requires_grad=False)
        self.head_audio = nn.Parameter(parts["head.audio"], requires_grad=False)
        self.stream_embedding = self.codebook_heads = None
        if cfg.audio_out.head == "shared":
            self.stream_embedding = nn.Parameter(parts["head.stream_embedding"], requires_grad=False)
        else:
            self.codebook_heads = nn.Parameter(parts["head.codebook_heads"], requires_grad=False)
        self.audio_input = audio_input
        self.register_buffer("audio_pad_ids", self.vocab.audio_pad_ids(), persistent=False)

    # --- loading ------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype | None = None,
                        attn_implementation: str = "sdpa") -> "UALMForConditionalGeneration":
        from transformers import AutoModelForCausalLM

        from ualm_nemo.convert.hf_folder import HFFolder, load_safetensors

        from ualm_nemo.model.config import UALMConfig
        from ualm_nemo.convert.qwen2_keymap import check_compatible

        folder = Path(folder)
        config_file = folder / UALM_CONFIG_FILE
        if not config_file.is_file():
            raise FileNotFoundError(f"{folder} is not a UALM export: no {UALM_CONFIG_FILE} "
                                    "(write one with examples/convert_ualm_to_hf.py)")
        cfg = UALMConfig.from_dict(json.loads(config_file.read_text()))
        if not (folder / AUDIO_FILE).is_file():
            raise FileNotFoundError(f"{folder} has no {AUDIO_FILE} (the audio rows, heads and adapter)")
        HFFolder(folder).check_files()  # a truncated model.safetensors is named (transformers' error does not)
        lm = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation)
        check_compatible(lm.config, cfg)
        parts = load_safetensors(folder / AUDIO_FILE)
        for key, shape in expected_audio_shapes(cfg).items():
            if key not in parts:
                raise ValueError(f"{folder / AUDIO_FILE} lacks {key!r} (model.audio_out.head={cfg.audio_out.head!r})")
            if tuple(parts[key].shape) != shape:
                raise ValueError(f"{folder / AUDIO_FILE} {key!r}: shape {tuple(parts[key].shape)} does not match "
                                 f"the expected {shape} from {UALM_CONFIG_FILE}")
        dtype = dtype or lm.model.embed_tokens.weight.dtype
        parts = {k: v.to(dtype) for k, v in parts.items()}
        audio_input = _audio_input(folder, cfg, parts, dtype) if cfg.audio_in.enabled else None
        return cls(cfg, lm, parts, audio_input).eval()

    @classmethod
    def from_checkpoint(cls, path: str | Path, dtype: torch.dtype | None = None,
                        attn_implementation: str = "sdpa") -> "UALMForConditionalGeneration":
        """A training checkpoint (a run's checkpoint folder or one ``iter_*``, saved at any TP/PP) straight into
        this class, without writing an HF folder: the export's tensor stream (exporter.iter_export over a
        streamed checkpoint reader) fills a transformers Qwen2 built on the meta device, so the model is held
        once. For generation with a KV cache from a Megatron checkpoint. Collective like the export: run it
        on every rank if torch.distributed has several (one process is the normal case).
        """
        from transformers import Qwen2ForCausalLM

        from ualm_nemo.convert.exporter import DTYPES, iter_export, open_checkpoint
        from ualm_nemo.convert.qwen2_keymap import qwen2_config_for
        from ualm_nemo.distributed.checkpoint import resolve_checkpoint, stored_model_config
        from ualm_nemo.distributed.parallel import init_distributed

        iteration = resolve_checkpoint(path)
        stored = stored_model_config(iteration)
        if stored is None:
            raise ValueError(f"{iteration} records no model config (ualm_config in ualm_common.pt)")
        init_distributed()
        cfg, skeleton, reader = open_checkpoint(iteration, stored)
        dtype = dtype or DTYPES[cfg.params_dtype]
        tensors: dict[str, dict[str, torch.Tensor]] = {"model": {}, "audio": {}, "encoder": {}}
        for part, name, tensor in iter_export(reader, cfg):
            tensors[part][name] = tensor.to(dtype)
        with torch.device("meta"):  # no random init: every weight is assigned from the checkpoint
            lm = Qwen2ForCausalLM(qwen2_config_for(cfg, attn_implementation=attn_implementation))
        lm.load_state_dict(tensors["model"], strict=True, assign=True)
        lm.model.rotary_emb = type(lm.model.rotary_emb)(config=lm.config)  # its buffers are not in the state
        audio_input = None
        if cfg.audio_in.enabled:
            audio_input = skeleton.audio_input  # encoder architecture from model.audio_in.encoder_path
            audio_input.encoder.tower.load_state_dict(tensors["encoder"], strict=True)
            adapter = {k.removeprefix("adapter."): v for k, v in tensors["audio"].items() if k.startswith("adapter.")}
            audio_input.adapter.load_state_dict(adapter, strict=True)
            audio_input = audio_input.to(dtype)
        left = [n for n, t in (*lm.named_parameters(), *lm.named_buffers()) if t.is_meta]
        if left:
            raise RuntimeError(f"{iteration}: the checkpoint did not fill {left[:5]}")
        return cls(cfg, lm, tensors["audio"], audio_input).eval()

    # --- math (model/stream_math.py: the reference the Megatron modules are tested against) -----------
    def embedding_tables(self) -> tuple[IdTable, IdTable, IdTable]:
        v = self.vocab
        return (IdTable(self.lm.model.embed_tokens.weight, 0, v.text_vocab_size),
                IdTable(self.embedding_specials, v.text_vocab_size, v.audio_offset),
                IdTable(self.embedding_audio, v.audio_offset, v.size))

    def embed(self, tokens: torch.Tensor, audio_features: torch.Tensor | None = None,
              audio_feature_lens: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [b, s, N] -> [b, s, h] (stream sum in stream order, as the Megatron embedding adds them)."""
        hidden = embed_streams(tokens, self.embedding_tables(), self.audio_pad_ids)
        if audio_features is None:
            return hidden
        if self.audio_input is None:
            raise ValueError("audio features given but this UALM has no audio input (audio_in.enabled=false)")
        from ualm_nemo.model.audio_input import splice_audio_embeddings

        audio = self.audio_input(audio_features, audio_feature_lens).to(hidden.dtype)
        mask = tokens[..., 0] == self.vocab.audio_in_id
        return splice_audio_embeddings(hidden.transpose(0, 1), mask, audio).transpose(0, 1)

    def heads(self, hidden: torch.Tensor, text: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [b, s, h] -> (stream-0 logits [b, s, vocab], codebook logits [b, s, N-1, span]).

        ``text=False`` leaves the text columns of stream 0 at -inf instead of computing them (audio steps)."""
        text_rows = self.lm.lm_head.weight if text else None
        stream0 = stream0_logits(hidden, (text_rows, self.head_specials, self.head_audio), self.vocab.text_vocab_size)
        if self.codebook_heads is not None:
            return stream0, codebook_logits(hidden, self.codebook_heads, None)
        rows = shared_codebook_rows(self.head_audio, self.vocab.num_codebooks, self.vocab.codebook_span)
        return stream0, codebook_logits(hidden, rows, self.stream_embedding)

    def forward(self, tokens: torch.Tensor, audio_features: torch.Tensor | None = None,
                audio_feature_lens: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [b, s, N] (unified ids; causal) -> (stream0 [b, s, V], codebooks [b, s, N-1, span]).

        attention_mask [b, s] (1 = real, 0 = padding) and position_ids [b, s] for padded batches; without
        them positions count from 0 (right padding is then exact for the real positions).
        """
        embeds = self.embed(tokens, audio_features, audio_feature_lens)
        hidden = self.lm.model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=False).last_hidden_state
        return self.heads(hidden)

    def decode(self, tokens: torch.Tensor, cache=None, attention_mask: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None, audio_features: torch.Tensor | None = None,
               audio_feature_lens: torch.Tensor | None = None,
               text: bool = True) -> tuple[torch.Tensor, torch.Tensor, object]:
        """Incremental decoding: ``tokens`` [b, t, N] are the positions after those held in ``cache`` (None to
        start) -> (stream-0 logits [b, V], codebook logits [b, N-1, span]) at the last new position, and the KV
        cache (transformers' DynamicCache) now holding every position. ``attention_mask`` [b, past + t] covers
        the cached positions too. Same math as :meth:`forward`."""
        embeds = self.embed(tokens, audio_features, audio_feature_lens)
        out = self.lm.model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                            past_key_values=cache, use_cache=True)
        stream0, codebooks = self.heads(out.last_hidden_state[:, -1:], text)
        return stream0[:, 0], codebooks[:, 0], out.past_key_values


def _audio_input(folder: Path, cfg: UALMConfig, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> nn.Module:
    from ualm_nemo.model.audio_input import AudioInput, FrozenAudioEncoder, load_audio_tower

    encoder_dir = Path(cfg.audio_in.encoder_path or "")
    encoder_dir = encoder_dir if encoder_dir.is_absolute() else folder / encoder_dir
    tower = load_audio_tower(encoder_dir)
    module = AudioInput(cfg.audio_in, cfg.backbone.hidden_size, encoder=FrozenAudioEncoder(tower))
    adapter = {k.removeprefix("adapter."): v for k, v in parts.items() if k.startswith("adapter.")}
    try:
        module.adapter.load_state_dict(adapter, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{folder / AUDIO_FILE}: adapter tensors do not match model.audio_in.adapter="
                         f"{cfg.audio_in.adapter!r}: {err}") from err
    return module.to(dtype)
