"""Text-to-audio evaluation: score sets of generated clips against reference clips with the paper's metrics.

A *row* is one set of generated clips (one CFG scale, one checkpoint) or, in reference mode, the reference clips
themselves (the paper's Ground Truth row). Every clip is read and run through each requested metric model once
(``extract``), then the row's figures are computed (``score_row``):

* ``fd_openl3``, ``fd_panns``: Fréchet distance to the reference set (frames / clips of each side pooled);
* ``kl_passt``: mean over id pairs of KL(gen || ref) (or ``ref||gen``); per item too;
* ``is_panns``: Inception Score (mean and std over min(10, clips) splits, RandomState(2020));
* ``clap``: mean cosine of caption and audio embeddings; per item too;
* ``aes``: mean CE / CU / PC / PQ; per item too.

Nothing shrinks silently: a clip that cannot be read is listed with its reason and every figure states how many
clips (or pairs) it used; generated and reference ids must be the same set (``TtaError`` otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from ualm_nemo.eval import audio_prep
from ualm_nemo.eval.checkpoints import sha256
from ualm_nemo.eval.divergences import inception_score, paired_kl
from ualm_nemo.eval.frechet import GaussianStats, frechet_distance

METRICS = ("fd_openl3", "kl_passt", "is_panns", "fd_panns", "clap", "aes")
NEEDS_REFERENCE = frozenset({"fd_openl3", "kl_passt", "fd_panns"})
LOWER_IS_BETTER = frozenset({"fd_openl3", "kl_passt", "fd_panns"})
MODEL_OF = {"fd_openl3": "openl3", "kl_passt": "passt", "is_panns": "panns", "fd_panns": "panns", "clap": "clap",
            "aes": "aes"}
IS_SPLITS = 10


class TtaError(ValueError):
    """An evaluation that cannot be scored as asked (ids that do not pair up, an empty set); meant for the user."""


@dataclass(frozen=True)
class Clip:
    id: str
    caption: str
    audio: Path | None  # None: the manifest lists the item without audio (it counts as unreadable)


@dataclass
class Features:
    """What the metric models made of a set of clips: per id, one entry per model; ``skipped``: id -> reason."""

    by_id: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    ids: list[str] = field(default_factory=list)

    def usable(self, key: str) -> list[str]:
        return [i for i in self.ids if i in self.by_id and key in self.by_id[i]]


@dataclass
class MetricModels:
    """The loaded metric models (None: not requested) and the files they came from."""

    openl3: Any = None
    passt: Any = None
    panns: Any = None
    clap: Any = None
    aes: Any = None
    files: dict[str, str] = field(default_factory=dict)  # model -> checkpoint path

    def checksums(self) -> dict[str, dict[str, str]]:
        return {name: {"path": path, "sha256": sha256(path)} for name, path in self.files.items()}


def parse_metrics(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise TtaError(f"--metrics {text!r}: choose from {', '.join(METRICS)}")
    return list(dict.fromkeys(names))


def load_models(metrics: Sequence[str], paths: Mapping[str, str | None], device: str = "cpu",
                openl3_content: str = "env", openl3_channels: int = 2, clap_tokenizer: str | None = None,
                clap_seed: int = 0) -> MetricModels:
    """Every model the metrics need, from ``paths`` (model -> local file); a missing file is an error before
    any model is built."""
    from ualm_nemo.eval.checkpoints import require_file

    needed = list(dict.fromkeys(MODEL_OF[m] for m in metrics))
    for name in needed:
        require_file(paths.get(name), f"--{name}")
    models = MetricModels(files={n: str(Path(paths[n]).resolve()) for n in needed})
    if "openl3" in needed:
        from ualm_nemo.eval.openl3_fd import OpenL3Embedder

        models.openl3 = OpenL3Embedder.load(paths["openl3"], openl3_content, channels=openl3_channels,
                                            device=device)
    if "passt" in needed:
        from ualm_nemo.eval.passt_kl import PasstClassifier

        models.passt = PasstClassifier.load(paths["passt"], device=device)
    if "panns" in needed:
        from ualm_nemo.eval.panns import PannsClassifier

        models.panns = PannsClassifier.load(paths["panns"], device=device)
    if "clap" in needed:
        from ualm_nemo.eval.clap_score import ClapScorer

        models.clap = ClapScorer.load(paths["clap"], clap_tokenizer, device=device, seed=clap_seed)
    if "aes" in needed:
        from ualm_nemo.eval.aesthetics import AesScorer

        models.aes = AesScorer.load(paths["aes"], device=device)
    return models


def extract(models: MetricModels, clips: Sequence[Clip], keys: Iterable[str],
            progress: Callable[[Iterable], Iterable] = lambda x: x) -> Features:
    """Run each clip through the models named in ``keys`` (openl3, passt, panns, clap, aes), once each."""
    keys = list(keys)
    features = Features(ids=[c.id for c in clips])
    for clip in progress(clips):
        if clip.audio is None:
            features.skipped[clip.id] = "no audio for this item in the manifest"
            continue
        try:
            wav, rate = audio_prep.read_audio(clip.audio)
        except audio_prep.AudioError as err:
            features.skipped[clip.id] = str(err)
            continue
        out: dict[str, Any] = {}
        if "openl3" in keys:
            out["openl3"] = models.openl3.embed(wav, rate)
        if "passt" in keys:
            out["passt"] = models.passt.probabilities(wav, rate)
        if "panns" in keys:
            out["panns_p"], out["panns"] = models.panns.outputs(wav, rate)
        if "clap" in keys:
            out["clap"] = models.clap.audio_embedding(wav, rate)
        if "aes" in keys:
            out["aes"] = models.aes.scores(wav, rate)
        features.by_id[clip.id] = out
    return features


def model_keys(metrics: Iterable[str], reference_side: bool) -> list[str]:
    """The models to run on one side: the reference side needs only the models of reference metrics."""
    return list(dict.fromkeys(MODEL_OF[m] for m in metrics if not reference_side or m in NEEDS_REFERENCE))


def score_row(metrics: Sequence[str], generated: Features, captions: Mapping[str, str],
              reference: Features | None, models: MetricModels, kl_direction: str = "gen||ref") -> dict[str, Any]:
    """One row's figures, per-item scores and the counts each figure rests on. ``reference`` None: the
    reference metrics are not applicable (the reference row) and reported as None."""
    figures: dict[str, Any] = {}
    used: dict[str, Any] = {}
    items: dict[str, dict[str, float]] = {i: {} for i in generated.ids if i in generated.by_id}
    for metric in metrics:
        if metric in NEEDS_REFERENCE and reference is None:
            figures[metric], used[metric] = None, "not applicable (reference vs itself)"
        elif metric in ("fd_openl3", "fd_panns"):
            key = "openl3" if metric == "fd_openl3" else "panns"
            gen_ids, ref_ids = generated.usable(key), reference.usable(key)
            used[metric] = {"generated_clips": len(gen_ids), "reference_clips": len(ref_ids)}
            gen = [np.atleast_2d(generated.by_id[i][key]) for i in gen_ids]
            ref = [np.atleast_2d(reference.by_id[i][key]) for i in ref_ids]
            rows_gen, rows_ref = sum(g.shape[0] for g in gen), sum(r.shape[0] for r in ref)
            used[metric].update(generated_frames=rows_gen, reference_frames=rows_ref)
            figures[metric] = (frechet_distance(GaussianStats.of(np.concatenate(gen)),
                                                GaussianStats.of(np.concatenate(ref)))
                               if rows_gen >= 2 and rows_ref >= 2 else None)
        elif metric == "kl_passt":
            pairs = [i for i in generated.usable("passt") if i in set(reference.usable("passt"))]
            used[metric] = {"pairs": len(pairs), "direction": kl_direction}
            if pairs:
                kl = paired_kl(np.stack([generated.by_id[i]["passt"] for i in pairs]),
                               np.stack([reference.by_id[i]["passt"] for i in pairs]), kl_direction)
                for i, value in zip(pairs, kl):
                    items[i]["kl_passt"] = float(value)
                figures[metric] = float(kl.mean())
            else:
                figures[metric] = None
        elif metric == "is_panns":
            ids = generated.usable("panns_p")
            splits = min(IS_SPLITS, len(ids))
            used[metric] = {"clips": len(ids), "splits": splits}
            if ids:
                mean, std = inception_score(np.stack([generated.by_id[i]["panns_p"] for i in ids]), splits)
                figures[metric], figures["is_panns_std"] = mean, std
            else:
                figures[metric] = None
        elif metric == "clap":
            from ualm_nemo.eval.clap_score import cosine

            ids = generated.usable("clap")
            used[metric] = {"clips": len(ids)}
            if ids:
                texts = models.clap.text_embeddings([captions[i] for i in ids])
                for i, text in zip(ids, texts):
                    items[i]["clap"] = cosine(generated.by_id[i]["clap"], text)
                figures[metric] = float(np.mean([items[i]["clap"] for i in ids]))
            else:
                figures[metric] = None
        elif metric == "aes":
            from ualm_nemo.eval.aesthetics import AXES

            ids = generated.usable("aes")
            used[metric] = {"clips": len(ids)}
            for axis in AXES:
                for i in ids:
                    items[i][f"aes_{axis}"] = generated.by_id[i]["aes"][axis]
                figures[f"aes_{axis}"] = float(np.mean([items[i][f"aes_{axis}"] for i in ids])) if ids else None
    return {"metrics": figures, "used": used, "items": items, "clips": len(generated.ids),
            "unreadable": dict(generated.skipped),
            "reference_unreadable": dict(reference.skipped) if reference is not None else {}}


def pair_up(generated: Sequence[Clip], reference_ids: Sequence[str], where: str) -> None:
    """Generated and reference ids must be the same set: a TtaError lists what differs (never a smaller set)."""
    gen, ref = {c.id for c in generated}, set(reference_ids)
    if not gen:
        raise TtaError(f"{where}: no generated clips")
    extra, missing = sorted(gen - ref), sorted(ref - gen)
    problems = []
    if missing:
        problems.append(f"{len(missing)} eval-set ids have no generated clip ({', '.join(missing[:5])}"
                        f"{', ...' if len(missing) > 5 else ''})")
    if extra:
        problems.append(f"{len(extra)} generated ids are not in the eval set ({', '.join(extra[:5])}"
                        f"{', ...' if len(extra) > 5 else ''})")
    if problems:
        raise TtaError(f"{where}: generated and reference ids differ: " + "; ".join(problems))


def protocols(openl3_content: str, openl3_channels: int, kl_direction: str, clap_seed: int) -> dict[str, dict]:
    """The settings each figure was computed with (written into the report)."""
    return {
        "fd_openl3": {"model": "torchopenl3 mel256 512-d", "content_type": openl3_content,
                      "channels": openl3_channels, "eval_rate": 44100, "model_rate": 48000, "window_s": 1.0,
                      "hop_s": 0.5, "centered": True, "peak_dbfs": -1.0, "statistics": "frames pooled over clips"},
        "kl_passt": {"model": "passt_s_swa_p16_128_ap476", "rate": 32000, "mono": True, "window_s": 10,
                     "hop_s": 5, "pad_if_longer_than_s": 1.5, "collect": "mean logits, then softmax",
                     "direction": kl_direction, "eps": 1e-6, "peak_dbfs": -1.0},
        "is_panns": {"model": "Cnn14_16k", "rate": 16000, "channel": "first", "dc_removed": True,
                     "min_s": 2.0, "softmax_over": 527, "splits": IS_SPLITS, "shuffle_seed": 2020},
        "fd_panns": {"model": "Cnn14_16k", "embedding": 2048, "statistics": "one embedding per clip"},
        "clap": {"model": "laion_clap 1.1.5 HTSAT-tiny fusion + RoBERTa", "rate": 48000, "mono": True,
                 "peak_dbfs": -1.0, "int16_round_trip": True, "fusion_crop_seed": clap_seed,
                 "shorter_than_10s": "repeat-padded", "score": "cosine(text, audio), mean over clips"},
        "aes": {"model": "audiobox_aesthetics 0.0.4", "rate": 16000, "mono": "channel mean", "chunk_s": 10,
                "hop_s": 10, "weights": "chunk length"},
    }
