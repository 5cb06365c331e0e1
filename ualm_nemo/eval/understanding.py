"""Audio-understanding evaluation (MMAU / MMAR): answer every question with the batched engine, then score.

Answers are decoded greedily in text mode from ``[audio] + "\\n" + prompt`` (the prompt asks for the option
text: audio_qa.QAItem.prompt). The run writes one manifest line per answered item (inference/jobs.py), so a
killed run resumes where it stopped. An item that cannot be answered is not dropped and does not stop the run:
its audio cannot be read (missing or broken file), the clip is unusable (NaN / infinite samples, shorter than
one encoder frame) or the prompt breaks the context rule (inference/pipeline.py). It is recorded with
``prediction=None`` and its reason (so a rerun does not try it again), and scores as wrong.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from ualm_nemo.data.formatting import AudioIn
from ualm_nemo.eval.audio_qa import QAItem, QAScore, Rejected, score
from ualm_nemo.inference.engine import GenerationConfig, Request
from ualm_nemo.inference.jobs import Item, OutputFolder
from ualm_nemo.inference.pipeline import InputRejected


def job_items(items: Sequence[QAItem]) -> list[Item]:
    """Benchmark items as job items (the prompt is what must match for a finished item to count)."""
    return [Item(i.id, i.prompt(), 0, {"audio": str(i.audio)}) for i in items]


def conversation(item: QAItem, wav) -> list:
    """The one-turn conversation that asks ``item`` about its audio ``wav`` (16 kHz mono [samples])."""
    return [("user", [AudioIn(wav), "\n" + item.prompt()])]


def answer(infer, items: Sequence[QAItem], folder: OutputFolder, todo: Sequence[Item], batch_size: int,
           cfg: GenerationConfig, progress: bool = True) -> None:
    """Answer the ``todo`` items, batch by batch; each answer is in the manifest as soon as its batch is done."""
    from tqdm import tqdm

    by_id = {i.id: i for i in items}
    with tqdm(total=len(todo), desc="answering", unit="question", disable=not progress) as bar:
        for start in range(0, len(todo), batch_size):
            chunk, requests, answerable = todo[start:start + batch_size], [], []
            for job in chunk:
                request, why = _request(infer, by_id[job.id], cfg)
                if request is None:  # recorded, scored as wrong, never dropped
                    folder.add(job, prediction=None, skipped=why[:300])
                else:
                    requests.append(request)
                    answerable.append(job)
            for job, reply in zip(answerable, infer.decode(requests, cfg)):
                folder.add(job, prediction=reply.text, stop=reply.stop)
            bar.update(len(chunk))


def _request(infer, item: QAItem, cfg: GenerationConfig) -> tuple[Request | None, str]:
    """(the item's request, "") or (None, why it cannot be answered: unreadable audio, or the input refused)."""
    from ualm_nemo.data.raw import load_audio

    try:
        wav = load_audio(item.audio)
    except Exception as err:  # soundfile raises several types for missing or broken files
        return None, f"audio unreadable: {err}"
    try:
        return infer.prepare(conversation(item, wav), "text", 0, cfg), ""
    except InputRejected as err:  # an unusable clip is unreadable audio too; anything else is refused
        return None, f"{'audio unreadable' if err.what == 'audio' else 'refused'}: {err}"


def predictions(folder: OutputFolder) -> tuple[dict[str, str], dict[str, str]]:
    """({id: prediction}, {id: why it was skipped}) from the folder's manifest."""
    entries, _, _ = folder.read_manifest()
    answered = {k: e["prediction"] for k, e in entries.items() if e.get("prediction") is not None}
    skipped = {k: e.get("skipped", "no prediction") for k, e in entries.items() if e.get("prediction") is None}
    return answered, skipped


def report(result: QAScore, rejected: Sequence[Rejected], skipped: dict[str, str], meta: dict[str, Any],
           out_dir: Path) -> tuple[Path, Path]:
    """``report.json`` (every figure, every item with its prediction) and ``report.md`` (the table)."""
    data = {**meta, "accuracy": result.accuracy, "correct": result.correct, "total": result.total,
            "unanswered": result.unanswered, "accuracy_over_answered": result.accuracy_over_answered,
            "answered": result.answered, "rejected_entries": [vars(r) for r in rejected],
            "skipped_items": skipped, "by_group": result.by_group, "items": result.items}
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    json_path.write_text(json.dumps(data, indent=2, ensure_ascii=False))
    lines = [f"# {meta.get('benchmark', 'benchmark').upper()}: {100 * result.accuracy:.2f} % "
             f"({result.correct} / {result.total})", "",
             f"checkpoint `{meta.get('checkpoint')}`; {len(rejected)} malformed entries not scored (listed in "
             f"report.json); {len(skipped)} items without an answer (unreadable audio or input refused, each with "
             "its reason in report.json) counted as wrong.", "",
             f"Over answered items only (the official scripts leave unanswered ones out): {over_answered(result)}.",
             ""]
    for key, groups in result.by_group.items():
        lines += [f"| {key} | accuracy | correct / total |", "|---|---|---|"]
        lines += [f"| {value} | {100 * g['accuracy']:.2f} % | {g['correct']} / {g['total']} |"
                  for value, g in groups.items()]
        lines.append("")
    md_path.write_text("\n".join(lines))
    return json_path, md_path


def over_answered(result: QAScore) -> str:
    """The official scripts' figure as text: accuracy over the items that have a prediction."""
    if result.accuracy_over_answered is None:
        return "no item answered"
    return f"{100 * result.accuracy_over_answered:.2f} % ({result.correct} / {result.answered})"


__all__ = ["answer", "conversation", "job_items", "over_answered", "predictions", "report", "score"]
