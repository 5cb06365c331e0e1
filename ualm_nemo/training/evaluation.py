"""Evaluation during training: every ``train.eval_every_n_steps`` steps the training model itself generates for
a small fixed eval set (the ``eval`` section: training/eval_config.py), and the figures the paper tracks across
pre-training are computed from it.

The pieces are the offline ones (one model math): the Megatron model decodes through
``inference.pipeline.UALMInference`` (``megatron_backend``: any TP, PP1), the run's codec decodes the audio, and
``eval.tta`` (CLAP, FD OpenL3 / PANNs vs the set's reference clips) and ``eval.audio_qa`` (the official MMAU /
MMAR matching rule) score it. Each data-parallel rank decodes every DP-size-th item (every TP rank of a replica
the same ones, in step), global rank 0 gathers the codes and answers, writes the clips to
``<output_dir>/evaluation/step_XXXXXXX/`` (a generate.py output folder: ``evaluate.py tta --generated`` scores it
again; at 48 kHz stereo through ``eval.enhancer`` when set) with ``qa.json``, scores them and shares the figures
with every rank.

Training is untouched: the model's train/eval flags and every RNG (torch, CUDA, Megatron's tracker, numpy,
random) are restored afterwards, so the steps after an evaluation are bit-identical to a run without it.

Figures (``evaluation.jsonl`` and ``eval/*`` in TensorBoard): ``clap``, ``fd_openl3``, ``fd_panns`` (those asked
for), ``tta_clips`` / ``tta_scored`` (clips without audio are counted, never silently dropped), ``qa_accuracy``
(unanswered items count as wrong), ``qa_correct`` / ``qa_total`` and ``qa_accuracy_<group>`` by MMAU task or MMAR
modality.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from ualm_nemo.inference.engine import GenerationConfig
from ualm_nemo.training.eval_config import EvalConfig, read_qa_set, read_tta_set
from ualm_nemo.training.run_config import RunConfig
from ualm_nemo.training.validation import ValidationLog

log = logging.getLogger(__name__)

EVAL_DIR = "evaluation"
TB_KEYS = ("clap", "fd_openl3", "fd_panns", "qa_accuracy")


def tta_generation(cfg: EvalConfig) -> GenerationConfig:
    """The decoding settings of the TTA items (what an offline re-run must use to get the same clips)."""
    return GenerationConfig(cfg_scale=cfg.cfg_scale, temperature=cfg.temperature, top_k=cfg.top_k,
                            max_frames=cfg.max_frames)


def qa_generation(cfg: EvalConfig) -> GenerationConfig:
    """The decoding settings of the QA answers (greedy text, as examples/evaluate.py understanding)."""
    return GenerationConfig(max_text_tokens=cfg.max_answer_tokens)


def step_folder(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / EVAL_DIR / f"step_{step:07d}"


class EvaluationLog(ValidationLog):
    """``<output_dir>/evaluation.jsonl``: one line {"step", **figures} per evaluation, each step once (a resumed
    job redoes the steps after its checkpoint: see ValidationLog)."""

    def __init__(self, output_dir: str | Path) -> None:
        super().__init__(output_dir, "evaluation.jsonl")


@contextlib.contextmanager
def training_state_kept(model: torch.nn.Module) -> Iterator[None]:
    """Run the body (which may switch ``model`` to eval mode and draw random numbers), then put back every
    module's train/eval flag and every RNG the training step reads."""
    from ualm_nemo.distributed.checkpoint import rng_state, set_rng_state

    flags = [(m, m.training) for m in model.modules()]
    state, np_state, py_state = rng_state(), np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag
        set_rng_state(state)
        np.random.set_state(np_state)
        random.setstate(py_state)


class TrainingEvaluator:
    """Holds the eval set (read once), the codec and the metric models (rank 0, loaded at the first call)."""

    def __init__(self, run: RunConfig) -> None:
        self.run, self.cfg = run, run.eval
        self.tta_items, self.references = read_tta_set(self.cfg) if self.cfg.tta_set else ([], {})
        self.qa_items = read_qa_set(self.cfg) if self.cfg.qa_set else []
        self.qa_audio: dict[str, torch.Tensor] | None = None
        self.tokenizer = None
        self.codec = self.postprocess = self.models = self.reference = None  # rank 0 only

    # --- every rank ----------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, step: int) -> dict[str, Any]:
        """Generate with ``model`` (the training chunk, all ranks together) -> the step's figures on every rank."""
        with training_state_kept(model):
            local = self._generate(model)
            shares = [None] * parallel_state.get_data_parallel_world_size()
            dist.all_gather_object(shares, local, group=parallel_state.get_data_parallel_group())
            box: list[dict | None] = [None]
            if dist.get_rank() == 0:
                try:
                    box[0] = self._score(step, shares)
                except Exception as err:  # shared, so that every rank stops here instead of waiting for rank 0
                    log.exception("evaluation at step %d failed", step)
                    box[0] = {"_error": f"{type(err).__name__}: {err}"}
            dist.broadcast_object_list(box, src=0)
        if "_error" in box[0]:
            raise RuntimeError(f"evaluation at step {step} failed on rank 0: {box[0]['_error']}")
        return box[0]

    def _generate(self, model: torch.nn.Module) -> dict[str, dict]:
        """This DP rank's share: {"codes": {id: [F, N] or None}, "answers": {id: text}}."""
        from ualm_nemo.data.raw import load_audio
        from ualm_nemo.data.tokenizer import build_tokenizer
        from ualm_nemo.eval.understanding import conversation
        from ualm_nemo.inference.pipeline import UALMInference

        if self.tokenizer is None:
            self.tokenizer = build_tokenizer(self.run.data.tokenizer)
        if self.qa_audio is None:
            self.qa_audio = {i.id: load_audio(i.audio) for i in self.qa_items}  # checked at launch: readable
        rank, size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
        tta, qa = self.tta_items[rank::size], self.qa_items[rank::size]
        infer = UALMInference(model, self.tokenizer, codec=None, batch_size=self.cfg.batch_size)
        replies = infer.text_to_audio([i.caption for i in tta], [i.seed for i in tta], tta_generation(self.cfg))
        codes = {i.id: r.audio[0].codes.cpu() if r.audio else None for i, r in zip(tta, replies)}
        replies = infer.reply([conversation(i, self.qa_audio[i.id]) for i in qa], "text", [0] * len(qa),
                              qa_generation(self.cfg))
        return {"codes": codes, "answers": {i.id: r.text for i, r in zip(qa, replies)}}

    # --- global rank 0 ---------------------------------------------------------------------------
    def _score(self, step: int, shares: list[dict]) -> dict[str, Any]:
        codes = {k: v for share in shares for k, v in share["codes"].items()}
        answers = {k: v for share in shares for k, v in share["answers"].items()}
        folder = step_folder(self.run.output_dir, step)
        figures: dict[str, Any] = {}
        if self.tta_items:
            figures.update(self._score_tta(step, folder, codes))
        if self.qa_items:
            figures.update(self._score_qa(folder, answers))
        return figures

    def _load_audio(self, device: str) -> None:
        """The run's codec and, with eval.enhancer, the 48 kHz post-processor (the one --enhancer loads)."""
        from ualm_nemo.inference.postprocess import load_postprocessor
        from ualm_nemo.training.data_setup import build_codec

        self.codec = build_codec(self.run.data, Path(self.run.output_dir)).to(device)
        if self.cfg.enhancer:  # checked at launch (eval_config): a failure here is a real fault, raised
            self.postprocess = load_postprocessor(self.cfg.enhancer, device)

    def _load(self) -> None:
        from ualm_nemo.eval import tta

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self._load_audio(device)
        metrics = self.cfg.tta_metrics
        self.models = tta.load_models(metrics, {k: getattr(self.cfg, k) for k in ("clap", "openl3", "panns")},
                                      device, self.cfg.openl3_content, clap_tokenizer=self.cfg.clap_tokenizer,
                                      clap_seed=self.cfg.clap_seed)
        keys = tta.model_keys(metrics, reference_side=True)
        if keys:  # the reference clips' features, once per job
            clips = [tta.Clip(i.id, i.caption, self.references[i.id]) for i in self.tta_items]
            self.reference = tta.extract(self.models, clips, keys)

    def _score_tta(self, step: int, folder: Path, codes: dict[str, torch.Tensor | None]) -> dict[str, Any]:
        from ualm_nemo.eval import tta, tta_report

        if self.codec is None:
            self._load()
        clips = self._write_clips(step, folder, codes)
        metrics = self.cfg.tta_metrics
        features = tta.extract(self.models, clips, tta.model_keys(metrics, reference_side=False))
        row = tta.score_row(metrics, features, {i.id: i.caption for i in self.tta_items}, self.reference,
                            self.models)
        row["audio"] = tta_report.clip_format(c.audio for c in clips)  # the rate and channels scored
        (folder / "scores.json").write_text(json.dumps(row, indent=1, default=float))
        figures = {m: row["metrics"][m] for m in metrics}
        return {**figures, "tta_clips": len(clips), "tta_scored": len(clips) - len(row["unreadable"])}

    def _write_clips(self, step: int, folder: Path, codes: dict[str, torch.Tensor | None]) -> list:
        """The step's clips decoded by the codec (then through eval.enhancer) into ``folder``, a generate.py
        output folder -> one eval.tta Clip per item (no path: no audio)."""
        from ualm_nemo.eval import tta
        from ualm_nemo.inference.audio_job import tta_settings
        from ualm_nemo.inference.jobs import OutputFolder

        settings = {**tta_settings(tta_generation(self.cfg)), "step": step, "enhancer": self.cfg.enhancer}
        post, clips = self.postprocess, []
        with OutputFolder(folder, settings) as out:
            out.prepare(out.plan(self.tta_items, overwrite=True))  # a resumed job redoes the step whole
            for item in self.tta_items:
                if codes[item.id] is None:
                    out.add(item, frames=0, skipped="no audio")
                    clips.append(tta.Clip(item.id, item.caption, None))
                    continue
                wav = self.codec.decode(codes[item.id].to(self.codec.device)).float().cpu()  # [samples] 16 kHz
                wav, rate = (post(wav), post.sample_rate) if post is not None else (wav[None], self.codec.sample_rate)
                entry = out.add(item, wav, rate, frames=int(codes[item.id].shape[0]))
                clips.append(tta.Clip(item.id, item.caption, folder / entry["audio"]))
        return clips

    def _score_qa(self, folder: Path, answers: dict[str, str]) -> dict[str, Any]:
        from ualm_nemo.eval.audio_qa import BREAKDOWNS, score

        result = score(self.qa_items, answers)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "qa.json").write_text(json.dumps({"accuracy": result.accuracy, "by_group": result.by_group,
                                                    "items": result.items}, indent=1, ensure_ascii=False))
        group = BREAKDOWNS[self.cfg.qa_kind][0]  # MMAU task / MMAR modality
        by = {f"qa_accuracy_{value}": g["accuracy"] for value, g in result.by_group.get(group, {}).items()}
        return {"qa_accuracy": result.accuracy, "qa_correct": result.correct, "qa_total": result.total, **by}
