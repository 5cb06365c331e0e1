"""The embedded default (``make demo``): synthesise data, train a tiny UALM on CPU, generate and save audio.

Everything runs offline in one process: the data set is synthetic (sounds that differ by caption, audio Q/A,
text), the codec is a tiny X-Codec with random codebooks, and the model is the ``tiny`` Qwen2-shaped backbone.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import soundfile

from ualm_nemo.codec.xcodec import CodecTokenizer
from ualm_nemo.data.formatting import AudioIn, tagged_parts
from ualm_nemo.data.raw import AUDIO_TAG, UnderstandingRecord, load_audio
from ualm_nemo.data.synthetic import synthesize_demo_data
from ualm_nemo.data.tokenizer import build_tokenizer
from ualm_nemo.inference.engine import GenerationConfig
from ualm_nemo.inference.pipeline import UALMInference
from ualm_nemo.training.train import checkpoint_dir, train

log = logging.getLogger(__name__)

DEMO_CAPTION = "a high beep"
VAL_DATA = "val_data"  # under the output dir: the held-out set (synthetic, another seed than the training set)
VAL_SAMPLES_PER_TASK = 4  # 12 held-out samples: 3 micro-batches of 4, scored 6 times per run (~1 % of its time)


def demo_config(output_dir: str, max_steps: int = 300) -> dict[str, Any]:
    """The demo's run; it validates ``max_steps // 6`` steps apart (at least every 2) on the held-out set that
    ``write_val_data`` writes, so ``<output_dir>/validation.jsonl`` is there for examples/plot_steps.py."""
    val = Path(output_dir) / VAL_DATA
    return {
        "model": {"backbone": "tiny", "audio_in": {"random_encoder": True}},
        "optim": {"lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 20, "weight_decay": 0.01},
        "train": {"stage": "pretrain", "max_steps": max_steps, "global_batch_size": 8, "micro_batch_size": 4,
                  "checkpoint_every_n_steps": 100, "log_every_n_steps": 10,
                  "val_every_n_steps": max(2, max_steps // 6), "val_batches": 3},
        "data": {"synthesize": True, "tokenizer": "byte", "val_tta_manifest": str(val / "tta.jsonl"),
                 "val_understanding_manifest": str(val / "understanding.json"),
                 "val_text_manifest": str(val / "text.jsonl")},
        "output_dir": output_dir,
    }


def write_val_data(output_dir: str) -> None:
    """The held-out set of ``demo_config`` (the same files at every call: a rerun rewrites them unchanged)."""
    from ualm_nemo.training.run_config import check_output_dir

    check_output_dir(output_dir)  # the run's own check (one line, ConfigError), before anything is written
    n = VAL_SAMPLES_PER_TASK
    synthesize_demo_data(Path(output_dir) / VAL_DATA, num_tta=n, num_understanding=n, num_text=n, seed=1)


def generate_demo_outputs(model, run_output_dir: Path, caption: str = DEMO_CAPTION,
                          max_frames: int = 150) -> dict[str, Any]:
    """Generate audio for ``caption`` with CFG and answer one understanding question, with the trained Megatron
    model itself (its KV cache; inference/pipeline.py).

    ``min_frames=50`` (1 s, the shortest synthetic clip): a briefly trained model ends the audio early, since
    codebook 0's pad fills the last frames of every training clip.
    """
    tokenizer = build_tokenizer(model.run.data.tokenizer)
    codec = CodecTokenizer.from_pretrained(run_output_dir / "codec")
    infer = UALMInference(model.engine.chunks[0], tokenizer, codec)
    reply = infer.text_to_audio([caption], seeds=[0], cfg=GenerationConfig(min_frames=50, max_frames=max_frames))[0]
    audio = reply.audio[0]
    wav_path = run_output_dir / "generated.wav"
    soundfile.write(wav_path, audio.wav[0].numpy(), audio.sample_rate)
    answer = _answer_demo_question(infer, model.train_dataset.records)
    return {"wav": wav_path, "frames": int(audio.codes.shape[0]), "seconds": audio.wav.shape[-1] / audio.sample_rate,
            "caption": caption, "answer": answer}


def _answer_demo_question(infer: UALMInference, records) -> dict[str, str] | None:
    record = next((r for r in records if isinstance(r, UnderstandingRecord)), None)
    if record is None:
        return None
    question = next(t for role, t in record.turns if role == "user")
    conversation = [("user", tagged_parts(question, [AudioIn(load_audio(record.audio_path))]))]
    reply = infer.reply([conversation], mode="text", cfg=GenerationConfig(max_text_tokens=40))[0]
    expected = next(t for role, t in record.turns if role == "assistant")
    return {"question": question.replace(AUDIO_TAG, "").strip(), "answer": reply.text, "reference": expected}


def run_demo(output_dir: str = "demo_out", max_steps: int = 300) -> dict[str, Any]:
    """Train (or, when ``output_dir`` holds a finished run, just load it: ``final_loss`` is then None) and
    generate."""
    write_val_data(output_dir)
    model = train(demo_config(output_dir, max_steps))
    result = generate_demo_outputs(model, Path(output_dir))
    final_loss = model.last_result.loss if model.last_result is not None else None
    result.update(checkpoints=checkpoint_dir(model.run), tensorboard=Path(output_dir) / "tensorboard",
                  validation=Path(output_dir) / "validation.jsonl",
                  data=Path(output_dir) / "data", final_loss=final_loss, step=model.engine.step, model=model)
    return result
