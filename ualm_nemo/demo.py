"""The embedded default (``make demo``): synthesise data, train a tiny UALM on CPU, generate and save audio.

Everything runs offline in one process: the data set is synthetic (sounds that differ by caption, audio Q/A,
text), the codec is a tiny X-Codec with random codebooks, and the model is the ``tiny`` Qwen2-shaped backbone.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import soundfile
import torch

from ualm_nemo.codec.xcodec import CodecTokenizer
from ualm_nemo.data.formatting import SampleFormatter
from ualm_nemo.data.tokenizer import build_tokenizer
from ualm_nemo.inference.generate import AudioGenerationConfig, generate_audio_codes, generate_text
from ualm_nemo.training.train import checkpoint_dir, train

log = logging.getLogger(__name__)

DEMO_CAPTION = "a high beep"


def demo_config(output_dir: str, max_steps: int = 300) -> dict[str, Any]:
    return {
        "model": {"backbone": "tiny"},
        "optim": {"lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 20, "weight_decay": 0.01},
        "train": {"stage": "pretrain", "max_steps": max_steps, "global_batch_size": 8, "micro_batch_size": 4,
                  "checkpoint_every_n_steps": 100, "log_every_n_steps": 10},
        "data": {"synthesize": True, "tokenizer": "byte"},
        "output_dir": output_dir,
    }


def generate_demo_outputs(model, run_output_dir: Path, caption: str = DEMO_CAPTION,
                          max_frames: int = 150) -> dict[str, Any]:
    """Generate audio for ``caption`` with CFG and answer one understanding question greedily.

    ``min_frames=50`` (1 s, the shortest synthetic clip): a briefly trained model ends the audio early, since
    codebook 0's pad fills the last frames of every training clip.
    """
    ualm = model.engine.chunks[0]
    vocab = model.run.model.vocab
    tokenizer = build_tokenizer(model.run.data.tokenizer)
    formatter = SampleFormatter(tokenizer, vocab, cfg_dropout=0.0)
    prompt = formatter.tta_prompt(caption)
    codes = generate_audio_codes(ualm, vocab, prompt, formatter.unconditional_prompt(prompt.shape[0]),
                                 AudioGenerationConfig(min_frames=50, max_frames=max_frames, seed=0))
    codec = CodecTokenizer.from_pretrained(run_output_dir / "codec")
    wav = codec.decode(codes)
    wav_path = run_output_dir / "generated.wav"
    soundfile.write(wav_path, wav.numpy(), codec.sample_rate)
    answer = _answer_demo_question(ualm, model, formatter, tokenizer)
    return {"wav": wav_path, "frames": int(codes.shape[0]), "seconds": wav.shape[0] / codec.sample_rate,
            "caption": caption, "answer": answer}


def _answer_demo_question(ualm, model, formatter: SampleFormatter, tokenizer) -> dict[str, str] | None:
    dataset = model.train_dataset
    for index, record in enumerate(dataset.records):
        if type(record).__name__ == "UnderstandingRecord":
            sample = dataset[index]
            break
    else:
        return None
    tokens, labels = sample["tokens"], sample["labels"]
    first_answer = int((labels[:, 0] != -100).nonzero()[0])  # the prompt ends where the answer's loss starts
    features = sample["audio_features"]
    ids = generate_text(ualm, formatter.vocab, tokens[: first_answer + 1], {tokenizer.im_end_id}, tokenizer.vocab_size,
                        max_new_tokens=40,
                        audio_features=features[None], audio_feature_lens=torch.tensor([features.shape[-1]]))
    question = [t for role, t in record.turns if role == "user"][0].replace("<sound>", "").strip()
    expected = [t for role, t in record.turns if role == "assistant"][0]
    return {"question": question, "answer": tokenizer.decode(ids), "reference": expected}


def run_demo(output_dir: str = "demo_out", max_steps: int = 300) -> dict[str, Any]:
    model = train(demo_config(output_dir, max_steps))
    result = generate_demo_outputs(model, Path(output_dir))
    result.update(checkpoints=checkpoint_dir(model.run), tensorboard=Path(output_dir) / "tensorboard",
                  data=Path(output_dir) / "data", final_loss=model.last_result.loss, model=model)
    return result
