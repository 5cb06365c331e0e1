"""Validation during training: a fixed held-out set scored every ``train.val_every_n_steps`` steps.

The held-out micro-batches (``data.val_sources`` Shar sources, or ``data.val_*_manifest`` files) are built once
per job, the same ones every time (fixed order, no CFG dropout), ``train.val_batches`` per data-parallel rank.
``ValidationLoss`` is the training loss (``objectives.LMObjective``: weighted per-position loss over counted
stream-0 targets) split by task and by stream; its report is summed exactly over micro-batches and DP ranks by
the engine (sums and counts; divided once, in ``summarise``)::

    report = [loss sum, stream-0 targets,
              (loss sum, stream-0 targets) per task of VAL_TASKS,
              (nll sum, learned targets) per stream]

Figures: ``loss`` (== ``engine.eval_loss`` on the same batches), ``loss_<task>`` / ``tokens_<task>`` for each
task present (token-weighted: they recombine to ``loss``), ``loss_stream<k>`` the mean NLL of stream k's
learned targets (unweighted). ``ValidationLog`` appends them to ``<output_dir>/validation.jsonl``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from ualm_nemo.data.microbatch import MicroBatch
from ualm_nemo.model.config import ConfigError
from ualm_nemo.model.vocab import IGNORE_INDEX
from ualm_nemo.training.objectives import REPORT
from ualm_nemo.training.run_config import RunConfig

log = logging.getLogger(__name__)

VAL_TASKS = ("tta", "understanding", "text", "conversation")
VAL_CODES_CACHE = "val_codes_cache.pt"  # under output_dir, next to training's codes_cache.pt
VAL_MANIFESTS = {"tta": "val_tta_manifest", "understanding": "val_understanding_manifest",
                 "text": "val_text_manifest"}


def position_tasks(batch: MicroBatch, tasks: tuple[str, ...] = VAL_TASKS) -> torch.Tensor:
    """The task index of every position -> LongTensor [b, s] (on the labels' device).

    ``batch.tasks`` holds one task per sample, row-major: one per row (``dataset.collate``), or one per
    segment of each packed row (``batching.collate_packed``, whose ``segment_ids`` [b, s] number a row's samples
    0, 1, ... and -1 on padding; padding takes its row's first sample's task and has no target anyway).
    """
    labels = batch.labels
    if batch.tasks is None:
        raise ValueError("validation scores language-model batches; a DPO pair batch has no tasks (collate_pairs)")
    unknown = sorted(set(batch.tasks) - set(tasks))
    if unknown:
        raise ValueError(f"validation scores the tasks {tasks}; a batch holds {unknown}")
    index = torch.tensor([tasks.index(t) for t in batch.tasks], dtype=torch.long, device=labels.device)
    b, s = labels.shape[:2]
    segments = batch.segment_ids
    if segments is None:
        return index[:, None].expand(b, s)
    per_row = batch.samples_per_row()  # [b]
    first = torch.cumsum(per_row, 0) - per_row  # [b] index of each row's first sample in ``tasks``
    return index[first[:, None] + segments.clamp(min=0)]


class ValidationLoss:
    """Forward-only objective: the LM loss and its per-task and per-stream parts (module docstring)."""

    per_stream = True

    def __init__(self, num_streams: int, tasks: tuple[str, ...] = VAL_TASKS) -> None:
        self.num_streams, self.tasks = num_streams, tasks

    def loss(self, batch: MicroBatch, nll: torch.Tensor):
        """nll [b, s, N] (each stream's NLL, 0 where IGNORE) -> the report vector."""
        labels = batch.labels
        per_position = (nll * batch.loss_weights.float()).sum(-1)  # [b, s]: exactly heads.loss
        counted = (labels[..., 0] != IGNORE_INDEX).float()  # [b, s] stream-0 targets (the normaliser)
        task = position_tasks(batch, self.tasks)
        by_task = [torch.stack([(per_position * (task == t)).sum(), (counted * (task == t)).sum()])
                   for t in range(len(self.tasks))]
        learned = (labels != IGNORE_INDEX).float()  # [b, s, N]
        by_stream = torch.stack([(nll.float() * learned).sum((0, 1)), learned.sum((0, 1))], dim=1)  # [N, 2]
        loss = per_position.float().sum()
        report = torch.cat([torch.stack([loss, counted.sum()]), torch.cat(by_task), by_stream.reshape(-1)])
        return loss * 0.0, counted.sum().to(torch.int), {REPORT: report.detach()}

    def summarise(self, total: torch.Tensor) -> dict[str, float]:
        """The summed report (float64) -> figures; tasks without targets are left out."""
        v = total.tolist()
        figures = {"loss": v[0] / max(v[1], 1.0), "tokens": int(v[1])}
        for t, name in enumerate(self.tasks):
            loss, count = v[2 + 2 * t], v[3 + 2 * t]
            if count:
                figures[f"loss_{name}"], figures[f"tokens_{name}"] = loss / count, int(count)
        base = 2 + 2 * len(self.tasks)
        for k in range(self.num_streams):
            loss, count = v[base + 2 * k], v[base + 2 * k + 1]
            if count:
                figures[f"loss_stream{k}"] = loss / count
        return figures


def _shar_batches(run: RunConfig, formatter, dp_rank: int, dp_size: int) -> list[MicroBatch]:
    from ualm_nemo.data.shar_dataset import SharBatchLoader, SharLoaderConfig

    data = run.data
    base = data.shar if data.shar is not None else SharLoaderConfig(sources=data.val_sources, seed=data.seed,
                                                                    seq_len=data.seq_len)
    keys = dataclasses.replace(base, sources=list(data.val_sources), num_workers=0)  # fixed order, from the start
    loader = SharBatchLoader(keys, formatter, dp_rank, dp_size)
    return list(itertools.islice(loader, run.train.val_batches))


def _manifest_batches(run: RunConfig, formatter, dp_rank: int, dp_size: int) -> list[MicroBatch]:
    from ualm_nemo.data.dataset import Collator, build_demo_dataset
    from ualm_nemo.training.data_setup import build_codec, rank0_first

    data, model, size = run.data, run.model, run.train.micro_batch_size
    manifests = {task: getattr(data, key) for task, key in VAL_MANIFESTS.items() if getattr(data, key)}
    codec = build_codec(data, Path(run.output_dir)) if "tta" in manifests else None
    dataset, rejects = rank0_first(lambda: build_demo_dataset(  # held-out clips encoded once per run, as training's
        manifests, formatter.tokenizer, codec, model.vocab, seed=data.seed, seq_len=data.seq_len, cfg_dropout=0.0,
        cache_path=Path(run.output_dir) / VAL_CODES_CACHE, text_weight=model.audio_out.text_weight,
        audio_stream_weight=model.audio_out.audio_stream_weight))
    for reject in rejects:
        log.warning("rejected (validation) %s", reject)
    mine = list(range(dp_rank, len(dataset), dp_size))  # DP rank r: items r, r + W, ... in manifest order
    collate = Collator(model.vocab)
    return [collate([dataset[i] for i in mine[k:k + size]])
            for k in range(0, len(mine) - size + 1, size)][:run.train.val_batches]


def build_val_batches(run: RunConfig, dp_rank: int, dp_size: int) -> list[MicroBatch]:
    """This DP rank's ``train.val_batches`` held-out micro-batches (CPU tensors), the same at every call."""
    from ualm_nemo.data.formatting import SampleFormatter
    from ualm_nemo.data.tokenizer import build_tokenizer

    formatter = SampleFormatter.from_config(build_tokenizer(run.data.tokenizer), run.model, cfg_dropout=0.0)
    build = _shar_batches if run.data.val_sources else _manifest_batches
    batches = build(run, formatter, dp_rank, dp_size)
    if len(batches) < run.train.val_batches:
        what = "data.val_sources" if run.data.val_sources else "the data.val_*_manifest files"
        raise ConfigError(f"train.val_batches={run.train.val_batches}, but {what} give data-parallel rank "
                          f"{dp_rank} of {dp_size} only {len(batches)} micro-batches of "
                          f"train.micro_batch_size={run.train.micro_batch_size}: lower train.val_batches")
    return batches


class ValidationLog:
    """``<output_dir>/validation.jsonl``: one line {"step", **figures} per validation. Writing step k first
    drops the lines of step k and later (a job resumed from an earlier checkpoint redoes them), so the file holds
    each step once; written whole to a temporary file and renamed."""

    def __init__(self, output_dir: str | Path, name: str = "validation.jsonl") -> None:
        self.path = Path(output_dir) / name

    def read(self) -> list[MicroBatch]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def append(self, step: int, figures: dict[str, Any]) -> None:
        lines = [r for r in self.read() if r["step"] < step] + [{"step": step, **figures}]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in lines))
        os.replace(tmp, self.path)
