"""The ``eval`` section of a run: the fixed eval set scored every ``train.eval_every_n_steps`` steps
(training/evaluation.py), its metric models and generation settings, checked before training starts.

* ``tta_set``: JSON lines ``{"id", "caption", "audio"?, "seed"?}`` (inference/jobs.read_items: the format of
  examples/generate.py and ``evaluate.py tta --data``); ``audio`` is the reference clip (relative to
  ``tta_audio_root``, default the file's folder), needed for FD. Each item decodes with its own seed (its
  ``seed``, else ``eval.seed`` + its position): the same draws at every evaluation.
* ``qa_set``: an MMAU (``qa_kind=mmau``: ``audio_id``) or MMAR (``mmar``: ``audio_path``) json list, its audio
  relative to ``qa_audio_root`` (default the file's folder); scored with the official matching rule.
* ``enhancer``: the 48 kHz stereo enhancement VAE (an exported folder, an enhancer run or one iter_*.ckpt, as
  ``generate.py --enhancer``): the TTA clips are written through it (the metrics resample as they do for any
  clip), like the paper's 48 kHz rows; unset, they are the codec's 16 kHz mono.
* Metric models (local files, never downloaded): ``clap`` + ``clap_tokenizer`` for ``eval/clap``; ``openl3`` and/or
  ``panns`` for ``eval/fd_openl3`` / ``eval/fd_panns`` against the set's reference clips.

Every problem is a ConfigError naming the key (and the file and entry), raised by ``validate`` (keys) and
``check_paths`` (files, read once here so a malformed line stops the launch, not step 5000).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ualm_nemo.model.config import ConfigError

QA_KINDS = ("mmau", "mmar")
METRIC_MODELS = ("clap", "openl3", "panns")  # eval keys of the models: clap, fd_openl3, fd_panns


@dataclass(kw_only=True)
class EvalConfig:
    tta_set: str | None = None
    tta_audio_root: str | None = None
    qa_set: str | None = None
    qa_kind: str = "mmau"
    qa_audio_root: str | None = None
    clap: str | None = None  # LAION-CLAP 630k-audioset-fusion-best.pt
    clap_tokenizer: str | None = None  # local roberta-base tokenizer folder (vocab.json, merges.txt)
    clap_seed: int = 0  # CLAP's fusion crops of clips over 10 s
    openl3: str | None = None  # torchopenl3 mel256 env 512-d weights: eval/fd_openl3
    openl3_content: str = "env"
    panns: str | None = None  # PANNs Cnn14_16k_mAP=0.438.pth: eval/fd_panns
    enhancer: str | None = None  # enhancement VAE: TTA clips written at 48 kHz stereo
    cfg_scale: float = 3.0
    temperature: float = 0.8
    top_k: int = 20
    max_frames: int = 1024
    max_answer_tokens: int = 64
    seed: int = 0  # seed of the first TTA item without its own (then +1 per item)
    batch_size: int = 8  # requests decoded together (per data-parallel rank)

    @property
    def tta_metrics(self) -> list[str]:
        """The TTA figures this config asks for (eval/tta.METRICS names)."""
        return [m for m, key in (("clap", "clap"), ("fd_openl3", "openl3"), ("fd_panns", "panns"))
                if getattr(self, key)]

    def validate(self, every: int) -> None:
        """The keys alone (no file is read): ``every`` is train.eval_every_n_steps."""
        if every < 0:
            raise ConfigError(f"train.eval_every_n_steps={every} must be >= 0 (0: no evaluation during training)")
        if self.qa_kind not in QA_KINDS:
            raise ConfigError(f"eval.qa_kind={self.qa_kind!r}: choose one of {QA_KINDS}")
        if self.openl3_content not in ("env", "music"):
            raise ConfigError(f"eval.openl3_content={self.openl3_content!r}: choose 'env' or 'music'")
        for key, low in (("max_frames", 1), ("max_answer_tokens", 1), ("batch_size", 1), ("top_k", 0),
                         ("seed", 0), ("clap_seed", 0)):
            if getattr(self, key) < low:
                raise ConfigError(f"eval.{key}={getattr(self, key)} must be >= {low}")
        if not self.cfg_scale > 0:
            raise ConfigError(f"eval.cfg_scale={self.cfg_scale} must be > 0")
        if self.temperature < 0:
            raise ConfigError(f"eval.temperature={self.temperature} must be >= 0 (0: greedy)")
        if not every:
            return
        if not (self.tta_set or self.qa_set):
            raise ConfigError(f"train.eval_every_n_steps={every} needs an eval set: set eval.tta_set and/or "
                              "eval.qa_set")
        if self.tta_set and not self.tta_metrics:
            raise ConfigError("eval.tta_set is scored by CLAP and/or FD: set eval.clap (+ eval.clap_tokenizer), "
                              "eval.openl3 or eval.panns")
        if self.clap and not self.clap_tokenizer:
            raise ConfigError("eval.clap needs eval.clap_tokenizer (a local roberta-base tokenizer folder)")
        if not self.tta_set and (self.clap or self.openl3 or self.panns):
            raise ConfigError("eval.clap / eval.openl3 / eval.panns score generated audio: set eval.tta_set too")
        if self.enhancer and not self.tta_set:
            raise ConfigError("eval.enhancer enhances the generated TTA clips: set eval.tta_set too")

    def check_paths(self, to_host: Callable[[str], str] = str) -> None:
        """Every file exists and the sets are well formed (read once, here), each problem naming its key."""
        for key in ("clap", "openl3", "panns"):
            value = getattr(self, key)
            if value and not Path(to_host(value)).is_file():
                raise ConfigError(f"eval.{key}={value!r}: no such checkpoint file (metric models are local files)")
        if self.clap_tokenizer and not (Path(to_host(self.clap_tokenizer)) / "vocab.json").is_file():
            raise ConfigError(f"eval.clap_tokenizer={self.clap_tokenizer!r}: not a tokenizer folder (no vocab.json)")
        if self.enhancer:
            self._check_enhancer(to_host)
        if self.tta_set:
            self._check_tta(to_host)
        if self.qa_set:
            self._check_qa(to_host)

    def _check_enhancer(self, to_host: Callable[[str], str]) -> None:
        from ualm_nemo.inference.postprocess import check_postprocessor

        try:
            check_postprocessor(to_host(self.enhancer))
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"eval.enhancer={self.enhancer!r}: {err}") from None

    def _check_tta(self, to_host: Callable[[str], str]) -> None:
        from ualm_nemo.inference.jobs import JobError

        try:
            items, references = read_tta_set(self, to_host)
        except JobError as err:
            raise ConfigError(f"eval.tta_set={self.tta_set!r}: {err}") from None
        fd = [key for key in ("openl3", "panns") if getattr(self, key)]
        if fd and len(references) < len(items):
            missing = [i.id for i in items if i.id not in references]
            raise ConfigError(f"eval.{fd[0]} (FD) compares with the reference clips: eval.tta_set={self.tta_set!r} "
                              f"has {len(missing)} items without \"audio\" ({', '.join(missing[:5])})")
        gone = [f"{i}: {p}" for i, p in references.items() if not Path(to_host(str(p))).is_file()]
        if gone:
            raise ConfigError(f"eval.tta_set={self.tta_set!r}: {len(gone)} reference clips do not exist (relative "
                              f"to eval.tta_audio_root), e.g. {gone[0]}")

    def _check_qa(self, to_host: Callable[[str], str]) -> None:
        if not Path(to_host(self.qa_set)).is_file():
            raise ConfigError(f"eval.qa_set={self.qa_set!r}: no such file")
        try:
            items = read_qa_set(self, to_host)
        except ValueError as err:
            raise ConfigError(f"eval.qa_set={self.qa_set!r}: {err}") from None
        gone = [f"{i.id}: {i.audio}" for i in items if not Path(to_host(str(i.audio))).is_file()]
        if gone:
            raise ConfigError(f"eval.qa_set={self.qa_set!r}: {len(gone)} audio files do not exist (relative to "
                              f"eval.qa_audio_root), e.g. {gone[0]}")


def read_tta_set(cfg: EvalConfig, to_host: Callable[[str], str] = str):
    """-> (jobs.Item list in file order, {id: reference clip path}) of eval.tta_set."""
    from ualm_nemo.inference.jobs import read_items

    if not Path(to_host(cfg.tta_set)).is_file():
        raise ConfigError(f"eval.tta_set={cfg.tta_set!r}: no such file")
    items = read_items(to_host(cfg.tta_set), first_seed=cfg.seed)
    root = Path(cfg.tta_audio_root) if cfg.tta_audio_root else Path(cfg.tta_set).parent
    references = {i.id: root / i.extra["audio"] for i in items if isinstance(i.extra.get("audio"), str)}
    return items, references


def read_qa_set(cfg: EvalConfig, to_host: Callable[[str], str] = str):
    """-> the QAItem list of eval.qa_set; a malformed entry is an error (a fixed eval set is scored whole)."""
    from ualm_nemo.eval.audio_qa import read_benchmark

    root = cfg.qa_audio_root or str(Path(cfg.qa_set).parent)  # as the job sees it (to_host maps it here)
    items, rejected = read_benchmark(to_host(cfg.qa_set), cfg.qa_kind, root)
    if rejected:
        raise ValueError(f"{len(rejected)} malformed entries, e.g. {rejected[0].where}: {rejected[0].reason}")
    return items
