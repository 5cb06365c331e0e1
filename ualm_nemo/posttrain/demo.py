"""The post-training recipe end to end on CPU (``make posttrain-demo``): the README runbook's commands, tiny.

    pre-train -> SFT-1 (enrichment + dialogue) -> pairs from the SFT-1 model (K candidates, CLAP + AES) ->
    reference log-probs -> DPO-1 -> self-reflection data made by the DPO-1 model -> SFT-2 -> pairs from the SFT-2
    model -> reference -> DPO-2

Every training step composes conf/train.yaml with the runbook's overrides (the same configs
``python examples/train.py stage=...`` reads; each step logs its command line) and calls the same functions as the
commands: ``training.train.train``, ``posttrain.score_reference.score_reference``,
``examples/make_preference_pairs.py``'s ``main``. What makes it tiny: the ``tiny`` backbone and random codec of
``make demo``, its synthetic clips as SFT-1 audio, random-weight CLAP / aesthetics checkpoints (their scores rank
nothing here; give real ones in production), learning rates far above the paper's so a few steps move the
model, and a handful of prompts. A rerun resumes: finished training runs are loaded, finished prompts skipped.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ualm_nemo.inference.reasoning import ENRICH, GENERATE

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
STOPWORDS = {"a", "an", "the", "of", "in", "on", "at", "and", "with", "some"}


@dataclass
class DemoSizes:
    pretrain_steps: int = 60
    sft_steps: int = 20
    dpo_steps: int = 8
    prompts: int = 4
    candidates: int = 3
    max_frames: int = 30
    max_text_tokens: int = 48


def compose_run(overrides: Sequence[str]) -> dict[str, Any]:
    """conf/train.yaml with command-line style overrides -> the run dict examples/train.py would train."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose("train", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def _train(name: str, overrides: Sequence[str]):
    from ualm_nemo.training.train import train

    log.info("[%s] python examples/train.py %s", name, " ".join(overrides))
    return train(compose_run(overrides))


def _score(name: str, overrides: Sequence[str]) -> Path:
    from ualm_nemo.distributed.parallel import init_distributed, teardown
    from ualm_nemo.posttrain.score_reference import score_reference

    log.info("[%s] python examples/score_reference.py %s", name, " ".join(overrides))
    init_distributed()
    try:
        return score_reference(compose_run(overrides))
    finally:
        teardown()


def _make_pairs(name: str, argv: Sequence[str]) -> dict[str, Any]:
    from ualm_nemo.testing.examples import load_example

    log.info("[%s] python examples/make_preference_pairs.py %s", name, " ".join(argv))
    if load_example("make_preference_pairs").main(list(argv)) != 0:
        raise RuntimeError(f"{name}: make_preference_pairs failed")
    return json.loads((Path(argv[argv.index("--output") + 1]) / "report.json").read_text())


def _teardown() -> None:
    from ualm_nemo.distributed.parallel import teardown

    teardown()  # inference and scoring set up their own process group; training sets up its own again


# --- data ------------------------------------------------------------------------------------------
def rich_caption(caption: str, seconds: float) -> dict[str, Any]:
    words = [w for w in caption.split() if w not in STOPWORDS]
    return {"keywords": words[:4] or [caption], "layout": f"0-{seconds:g} s: {caption}", "description": caption}


def write_sft1_manifest(tta_manifest: Path, folder: Path, seed: int = 0) -> Path:
    """SFT-1 conversations from ``make demo``'s synthetic TTA clips: enrichment (request -> rich caption -> the
    clip, with the reasoning templates inference uses) and dialogue (a vague request, a clarifying question, the
    answer, the clip)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines = []
    for k, entry in enumerate(json.loads(line) for line in tta_manifest.read_text().splitlines() if line.strip()):
        clip = {"audio": str((tta_manifest.parent / entry["location"]).resolve()), "start": entry["start_time"],
                "end": entry["end_time"]}
        caption = entry["caption"]
        if k % 2 == 0:
            turns = [{"role": "user", "content": ENRICH.format(prompt=caption)},
                     {"role": "assistant", "content": [{"rich_caption": rich_caption(caption, entry["duration"])}]},
                     {"role": "user", "content": GENERATE},
                     {"role": "assistant", "content": [clip]}]
        else:
            turns = [{"role": "user", "content": rng.choice(("Make me a sound.", "I need a sound effect."))},
                     {"role": "assistant", "content": "What should it sound like?"},
                     {"role": "user", "content": caption},
                     {"role": "assistant", "content": [clip]}]
        lines.append({"id": f"sft1-{k:04d}", "turns": turns})
    path = folder / "sft.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def write_prompts(captions: Sequence[str], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": f"p{k}", "caption": c}) + "\n" for k, c in enumerate(captions)))
    return path


def _captions(tta_manifest: Path, n: int) -> list[str]:
    seen: list[str] = []
    for line in tta_manifest.read_text().splitlines():
        caption = json.loads(line)["caption"]
        if caption not in seen:
            seen.append(caption)
    return (seen * n)[:n] if seen else []


def make_reflection_data(checkpoint: Path, codec: Path, prompts: Sequence[str], folder: Path,
                         sizes: DemoSizes) -> dict[str, Any]:
    """Self-reflection transcripts of the model at ``checkpoint`` -> folder/reflection.jsonl (+ clips, codes), as
    examples/make_reflection_data.py writes them, with the demo's stand-in texts; prompts already done are kept."""
    from ualm_nemo.codec.xcodec import CodecTokenizer
    from ualm_nemo.data.tokenizer import build_tokenizer
    from ualm_nemo.inference.engine import GenerationConfig
    from ualm_nemo.inference.load import load_for_inference
    from ualm_nemo.inference.pipeline import UALMInference
    from ualm_nemo.inference.reasoning import self_reflect
    from ualm_nemo.posttrain.reflection_data import ReflectionFolder

    out = ReflectionFolder(folder)
    todo = [(f"reflect-{k}", p) for k, p in enumerate(prompts) if f"reflect-{k}" not in out.done]
    if todo:
        model, _, _ = load_for_inference(checkpoint)
        infer = UALMInference(model, build_tokenizer("byte"), CodecTokenizer.from_pretrained(codec))
        cfg = GenerationConfig(max_frames=sizes.max_frames, min_frames=min(10, sizes.max_frames),
                               max_text_tokens=sizes.max_text_tokens)
        transcripts = self_reflect(infer, [p for _, p in todo], cfg=cfg)
        _teardown()
        out.add(transcripts, [i for i, _ in todo], texts=[stand_in_texts(p, t) for (_, p), t in zip(todo, transcripts)])
    skipped = [(r["id"], r["reason"]) for r in out.read(out.skipped_path)]
    return {"records": len(out.read(out.path)), "skipped": skipped, "path": out.path}


def stand_in_texts(prompt: str, transcript) -> dict[str, str]:
    """The demo's stand-ins for the captioner and judge that write the plan, the caption of the result and the
    critique in production (a tiny model's own text is undecodable bytes): facts the demo knows."""
    from ualm_nemo.data.rich_caption import RichCaption

    seconds = next(step.audio[0].seconds for step in transcript.steps if step.role == "assistant" and step.audio)
    plan = RichCaption(**{k: tuple(v) if k == "keywords" else v for k, v in rich_caption(prompt, 2.0).items()})
    heard = RichCaption(("sound",), f"0-{seconds:g} s: one sound", f"A sound of {seconds:g} seconds.")
    return {"plan": plan.render(), "listen": heard.render(),
            "critique": f"The plan asks for {prompt} over 2 s; the clip lasts {seconds:g} s. Make it {prompt}, 2 s."}


# --- the chain -------------------------------------------------------------------------------------
def run_posttrain_demo(output_dir: str | Path = "posttrain_demo_out", sizes: DemoSizes | None = None
                       ) -> dict[str, Any]:
    from ualm_nemo.testing.metric_models import write_random_aes, write_random_clap

    sizes = sizes or DemoSizes()
    out = Path(output_dir).resolve()
    result: dict[str, Any] = {"output_dir": out}
    small = ["train.global_batch_size=4", "train.micro_batch_size=2", "train.log_every_n_steps=1"]
    pre = _train("pre-train", ["stage=pretrain", f"output_dir={out}/pretrain", f"train.max_steps={sizes.pretrain_steps}",
                               "optim.lr=2e-3", "optim.min_lr=2e-4", "optim.warmup_steps=5", "train.log_every_n_steps=10"])
    result["pretrain"] = _summary(pre)
    codec, tta = out / "pretrain" / "codec", out / "pretrain" / "data" / "tta.jsonl"

    def sft(name: str, manifest: Path, init_from: Path) -> Any:
        return _train(name, ["stage=sft", f"output_dir={out}/{name}", f"train.init_from={init_from}",
                             f"data.sft_manifest={manifest}", f"data.codec_path={codec}",
                             f"train.max_steps={sizes.sft_steps}", "optim.lr=1e-3", "optim.min_lr=1e-4",
                             "optim.warmup_steps=2", *small])

    def dpo(name: str, pairs: Path, reference: Path) -> Any:
        overrides = ["stage=dpo", f"output_dir={out}/{name}", f"train.init_from={reference}",
                     f"data.dpo_manifest={pairs}", f"dpo.reference_checkpoint={reference}",
                     f"dpo.reference_logps={out}/{name}_reference.json", f"train.max_steps={sizes.dpo_steps}",
                     "optim.lr=5e-5", "optim.min_lr=5e-5", "optim.warmup_steps=0", "train.global_batch_size=2",
                     "train.micro_batch_size=1", "train.log_every_n_steps=1"]
        _score(f"{name} reference", overrides)
        return _train(name, overrides)

    def pairs(name: str, checkpoint: Path, prompts: Path) -> dict[str, Any]:
        return _make_pairs(name, ["--checkpoint", str(checkpoint), "--codec", str(codec), "--prompts", str(prompts),
                                  "--output", str(out / name), "--num-candidates", str(sizes.candidates),
                                  "--max-frames", str(sizes.max_frames), "--min-frames", str(min(10, sizes.max_frames)),
                                  "--clap", str(metric["clap"]), "--clap-tokenizer", str(metric["clap_tokenizer"]),
                                  "--aes", str(metric["aes"]), "--no-progress"])

    # round 1
    sft1 = sft("sft1", write_sft1_manifest(tta, out / "sft1_data"), out / "pretrain" / "checkpoints")
    result["sft1"] = _summary(sft1)
    metric = write_random_clap(out / "metric_models")
    metric["aes"] = write_random_aes(out / "metric_models" / "checkpoint.pt")
    prompts = write_prompts(_captions(tta, sizes.prompts), out / "prompts.jsonl")
    result["pairs1"] = pairs("pairs1", out / "sft1" / "checkpoints", prompts)
    result["dpo1"] = _summary(dpo("dpo1", out / "pairs1" / "pairs.jsonl", out / "sft1" / "checkpoints"))
    # round 2
    reflection = make_reflection_data(out / "dpo1" / "checkpoints", codec, _captions(tta, sizes.prompts),
                                      out / "reflection", sizes)
    result["reflection"] = reflection
    sft2_manifest = out / "reflection" / "sft2.jsonl"  # the reflection records + the SFT-1 set (absolute paths)
    sft2_manifest.write_text(reflection["path"].read_text() + (out / "sft1_data" / "sft.jsonl").read_text())
    result["sft2"] = _summary(sft("sft2", sft2_manifest, out / "dpo1" / "checkpoints"))
    result["pairs2"] = pairs("pairs2", out / "sft2" / "checkpoints", prompts)
    result["dpo2"] = _summary(dpo("dpo2", out / "pairs2" / "pairs.jsonl", out / "sft2" / "checkpoints"))
    return result


def _summary(model) -> dict[str, Any]:
    """What a stage left: its checkpoints, last step and loss, and (DPO) the margin and accuracy of its last step."""
    last = model.last_result
    summary: dict[str, Any] = {"checkpoints": Path(model.run.output_dir) / "checkpoints", "step": model.engine.step,
                               "loss": last.loss if last is not None else None,
                               "first_loss": model.loss_history[0][1] if model.loss_history else None,
                               "rejects": len(getattr(model, "rejects", None) or [])}
    if last is not None and last.metrics is not None:
        summary.update(margin=last.metrics.margin, accuracy=last.metrics.accuracy)
    return summary
