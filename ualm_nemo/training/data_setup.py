"""cfg.data -> training dataset: tokenizer, codec, (demo) synthesis, manifests read with every reject counted."""

from __future__ import annotations

import logging
from pathlib import Path

import torch.distributed as dist

from ualm_nemo.model.config import ConfigError, UALMConfig
from ualm_nemo.training.run_config import DataConfig

log = logging.getLogger(__name__)


def build_codec(data: DataConfig, output_dir: Path):
    """The X-Codec tokenizer: a user-supplied local folder, or the tiny random codec (saved for generation)."""
    from ualm_nemo.codec.xcodec import CodecTokenizer, build_tiny_xcodec, load_xcodec

    if data.codec_path and Path(data.codec_path).exists():
        return CodecTokenizer(load_xcodec(data.codec_path))
    if data.codec_path:
        raise ConfigError(f"data.codec_path={data.codec_path!r} does not exist")
    model = build_tiny_xcodec(seed=data.seed)
    if not dist.is_initialized() or dist.get_rank() == 0:
        model.save_pretrained(output_dir / "codec")  # generation decodes with exactly this codec
    return CodecTokenizer(model)


CODES_CACHE = "codes_cache.pt"  # under output_dir: the codec tokens of every clip, encoded once per run


def rank0_first(build):
    """``build()`` on rank 0 first (it encodes the clips and writes the codes cache), then on the other ranks
    (they read the cache instead of encoding): every rank encoding every clip at every job start is hours at
    scale."""
    first = not dist.is_initialized() or dist.get_rank() == 0
    if not first:
        dist.barrier()
    result = build()
    if first and dist.is_initialized():
        dist.barrier()
    return result


def _log_rejects(rejects, what: str, size: int) -> None:
    for reject in rejects:
        log.warning("rejected %s", reject)
    log.info("%s: %d samples, %d rejected records", what, size, len(rejects))


def build_posttrain_dataset(data: DataConfig, model: UALMConfig, output_dir: str | Path):
    """data.sft_manifest (conversations) or data.dpo_manifest (pairs) -> (dataset, rejects). Written wav clips are
    codec-encoded once into ``output_dir/codes_cache.pt``; pairs of pre-sampled ``codes`` need no codec."""
    from ualm_nemo.data.conversation import read_conversation_manifest, read_preference_manifest
    from ualm_nemo.data.formatting import SampleFormatter
    from ualm_nemo.data.posttrain_dataset import ConversationDataset, PreferenceDataset, written_clips
    from ualm_nemo.data.tokenizer import build_tokenizer

    output_dir = Path(output_dir)
    formatter = SampleFormatter.from_config(build_tokenizer(data.tokenizer), model, cfg_dropout=data.cfg_dropout)
    sft = bool(data.sft_manifest)
    manifest = data.sft_manifest or data.dpo_manifest
    read = (read_conversation_manifest if sft else read_preference_manifest)(manifest)
    codec = build_codec(data, output_dir) if written_clips(read.records) else None
    dataset = rank0_first(lambda: (ConversationDataset if sft else PreferenceDataset).from_records(
        read.records, formatter, codec, seed=data.seed, seq_len=data.seq_len, cache_path=output_dir / CODES_CACHE))
    rejects = read.rejects + dataset.skipped
    _log_rejects(rejects, "SFT conversations" if sft else "DPO pairs", len(dataset))
    if len(dataset) == 0:
        raise ConfigError(f"{manifest}: no usable record ({len(rejects)} rejected, the reasons are logged above)")
    return dataset, rejects


def build_train_dataset(data: DataConfig, model: UALMConfig, output_dir: str | Path):
    if data.sft_manifest or data.dpo_manifest:
        return build_posttrain_dataset(data, model, output_dir)
    from ualm_nemo.data.dataset import build_demo_dataset
    from ualm_nemo.data.synthetic import synthesize_demo_data
    from ualm_nemo.data.tokenizer import build_tokenizer

    output_dir = Path(output_dir)
    manifests = {"tta": data.tta_manifest, "understanding": data.understanding_manifest, "text": data.text_manifest}
    manifests = {k: v for k, v in manifests.items() if v}
    if data.synthesize:
        if not dist.is_initialized() or dist.get_rank() == 0:
            n = data.synthetic_samples_per_task
            synthesize_demo_data(output_dir / "data", num_tta=n, num_understanding=n, num_text=n, seed=data.seed)
        if dist.is_initialized():
            dist.barrier()
        manifests = {k: output_dir / "data" / name for k, name in
                     (("tta", "tta.jsonl"), ("understanding", "understanding.json"), ("text", "text.jsonl"))}
    tokenizer = build_tokenizer(data.tokenizer)
    if tokenizer.vocab_size > model.backbone.text_vocab_size:
        raise ConfigError(f"tokenizer has {tokenizer.vocab_size} ids but model.backbone.text_vocab_size is "
                          f"{model.backbone.text_vocab_size}")
    codec = build_codec(data, output_dir) if "tta" in manifests else None
    dataset, rejects = rank0_first(lambda: build_demo_dataset(
        manifests, tokenizer, codec, model.vocab, seed=data.seed, seq_len=data.seq_len,
        cache_path=output_dir / CODES_CACHE, cfg_dropout=data.cfg_dropout, text_weight=model.audio_out.text_weight,
        audio_stream_weight=model.audio_out.audio_stream_weight))
    _log_rejects(rejects, "training data", len(dataset))
    return dataset, rejects
