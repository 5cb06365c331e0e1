"""Preference pairs from the model itself: K sampled candidates per prompt, scored, best vs worst.

examples/make_preference_pairs.py drives it. Per prompt, K candidates are sampled by the batched generator (all K
of several prompts in one ``UALMInference.reply`` call); candidate ``k`` of prompt ``p`` has the seed
``candidate_seed(base seed, p, k)``, so it is the same alone, in any batch and in a rerun. Each candidate's wav is
scored by the evaluation metrics (eval/clap_score.py, eval/aesthetics.py: local metric-model files, never
downloaded), read back from the file as evaluate.py would read it. The rule: a combined score per candidate
``sum_m weight_m * score_m``; chosen = the best, rejected = the worst (the first of equals, by k); a prompt whose
margin (best - worst) is 0 (``tie``) or below ``min_margin`` (``margin_below_min``), or that has fewer than two
scored candidates (``too_few_scored``: auto mode may answer in text only), gives no pair and is counted.

The output folder (what the DPO data side reads; every path in it is relative to the folder)::

    settings.json                  what made the candidates and the rule (a rerun must ask for the same)
    candidates/<prompt_id>/<k>.npy the codec codes the model wrote, int16 [F, 8] (score these, never a re-encode)
    candidates/<prompt_id>/<k>.wav their decoded audio (codec rate, 16-bit), what the metrics scored
    candidates.jsonl               one line per candidate: prompt_id, k, seed, codes, audio, scores (every metric
                                   scored, weighted or not), combined, frames, response (the assistant turn's
                                   parts: {"text"} / {"codes"}), prompt (the turns), caption, stop
    pairs.jsonl                    one DPO record per kept prompt: id, prompt, chosen, rejected, scores
    report.json                    counts, skip reasons, the rule, the metric models (path + sha256), and with
                                   a ``Selection`` (targeted DPO-2) how the paired prompts were picked

Resume: a prompt is finished when all K of its lines are in candidates.jsonl and their files are whole. Files are
written under temporary names and renamed into place, and a prompt's K lines are appended (and flushed to disk)
only once all its files are in place; a rerun drops a torn last line and the lines of unfinished prompts, redoes
those prompts, and rebuilds pairs.jsonl and report.json from candidates.jsonl (``build_pairs``). A rerun with other
settings, or with another prompt under a finished prompt's id, is refused. One run holds the folder (flock).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
ROLES = ("system", "user", "assistant")
SETTINGS_FILE = "settings.json"
CANDIDATES = "candidates.jsonl"
PAIRS = "pairs.jsonl"
REPORT = "report.json"
CANDIDATE_DIR = "candidates"
AES_AXES = ("CE", "CU", "PC", "PQ")
METRICS = ("clap", *(f"aes_{a.lower()}" for a in AES_AXES))
MODEL_OF = {"clap": "clap", **{f"aes_{a.lower()}": "aes" for a in AES_AXES}}
# CLAP (a cosine, in [-1, 1]) leads; production quality (a 1-10 scale, so larger steps) at a quarter weight
DEFAULT_WEIGHTS = {"clap": 1.0, "aes_pq": 0.25}
RULES = ("best-vs-worst",)
SELECT_BY = ("best", "spread")  # targeted rounds: lowest best-candidate score / largest spread = worst
SKIP_REASONS = ("too_few_scored", "tie", "margin_below_min")
MAX_REPORTED = 100


class PairsError(ValueError):
    """Input or an output folder a run refuses; the message is meant for the user as is."""


class SettingsConflict(PairsError):
    """The folder was written with other settings (or holds another prompt under a finished prompt's id)."""


# --- prompts -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prompt:
    """One prompt: its conversation (text turns, ending with a user turn) and the caption the CLAP score
    compares the audio with (the caption itself, or the conversation's last user turn)."""

    id: str
    turns: tuple[tuple[str, str], ...]
    caption: str

    @property
    def messages(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.turns]

    def conversation(self) -> list[tuple[str, list[str]]]:
        return [(role, [content]) for role, content in self.turns]


def read_prompts(path: str | Path, max_chars: int = 2000) -> list[Prompt]:
    """A JSON-lines file of ``{"id", "caption"}`` or ``{"id", "prompt": [{"role", "content"}, ...]}`` (with an
    optional "caption" for CLAP). Every bad line is reported at once, as file:line, in one PairsError."""
    path = Path(path)
    if not path.is_file():
        raise PairsError(f"--prompts {path}: no such file")
    prompts: list[Prompt] = []
    errors: list[str] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        where = f"{path}:{number}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            errors.append(f"{where}: not UTF-8")
            continue
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            errors.append(f"{where}: invalid JSON ({err.msg} at column {err.colno})")
            continue
        problem, prompt = _prompt(obj, max_chars)
        if problem is None and prompt.id in seen:
            problem = f"duplicate id {prompt.id!r} (first at line {seen[prompt.id]})"
        if problem is not None:
            errors.append(f"{where}: {problem}")
            continue
        seen[prompt.id] = number
        prompts.append(prompt)
    if errors:
        more = f"\n  ... and {len(errors) - MAX_REPORTED} more" if len(errors) > MAX_REPORTED else ""
        raise PairsError(f"{len(errors)} bad prompt line(s):\n  " + "\n  ".join(errors[:MAX_REPORTED]) + more)
    if not prompts:
        raise PairsError(f"--prompts {path}: no prompts in the file")
    return prompts


def _prompt(obj: Any, max_chars: int) -> tuple[str | None, Prompt | None]:
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}", None
    prompt_id = obj.get("id")
    if isinstance(prompt_id, int) and not isinstance(prompt_id, bool):
        prompt_id = str(prompt_id)
    if prompt_id is None:
        return "no \"id\" (ids name the candidates' folder and seed them: give each prompt one)", None
    if not isinstance(prompt_id, str) or not ID_PATTERN.fullmatch(prompt_id):
        return (f"id {prompt_id!r} cannot name a folder: use 1-200 letters, digits, '.', '_' or '-', "
                "not starting with '.'"), None
    caption = obj.get("caption")
    if caption is not None:
        problem = _text_problem("caption", caption, max_chars)
        if problem:
            return problem, None
    if "prompt" not in obj:
        if caption is None:
            return "no \"caption\" or \"prompt\"", None
        return None, Prompt(prompt_id, (("user", caption),), caption)
    turns = obj["prompt"]
    if not isinstance(turns, list) or not turns:
        return "\"prompt\" must be a non-empty list of {\"role\", \"content\"} turns", None
    parsed = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict) or set(turn) != {"role", "content"}:
            return f"prompt turn {index}: expected {{\"role\", \"content\"}}", None
        if turn["role"] not in ROLES:
            return f"prompt turn {index}: role {turn['role']!r} (system, user, assistant)", None
        if not isinstance(turn["content"], str):
            return f"prompt turn {index}: content must be text (audio parts in prompts are not supported)", None
        problem = _text_problem(f"prompt turn {index} content", turn["content"], max_chars)
        if problem:
            return problem, None
        parsed.append((turn["role"], turn["content"]))
    roles = [role for role, _ in parsed]
    if "user" not in roles:
        return "the prompt has no user turn", None
    if roles[-1] != "user":
        return f"the prompt's last turn is a {roles[-1]} turn, expected a user turn (the one answered)", None
    if caption is None:
        caption = [content for role, content in parsed if role == "user"][-1]
    return None, Prompt(prompt_id, tuple(parsed), caption)


def _text_problem(name: str, value: Any, max_chars: int) -> str | None:
    if not isinstance(value, str):
        return f"{name} must be a string, got {type(value).__name__}"
    if not value.strip():
        return f"empty {name}"
    if len(value) > max_chars:
        return f"{name} has {len(value)} characters, more than --max-caption-chars {max_chars}"
    return None


def candidate_seed(base_seed: int, prompt_id: str, k: int) -> int:
    """The seed of candidate ``k`` of ``prompt_id``: a hash of the three, in [0, 2**63)."""
    digest = hashlib.sha256(json.dumps([int(base_seed), prompt_id, int(k)]).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & (2 ** 63 - 1)


# --- the rule ------------------------------------------------------------------------------------------------
def parse_weights(specs: Sequence[str]) -> dict[str, float]:
    """``["clap=1.0", "aes_pq=0.25"]`` -> {metric: weight}; no specs: DEFAULT_WEIGHTS."""
    if not specs:
        return dict(DEFAULT_WEIGHTS)
    weights: dict[str, float] = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        name = name.strip()
        if not sep or name not in METRICS:
            raise PairsError(f"--metric {spec!r}: expected NAME=WEIGHT with NAME one of {', '.join(METRICS)}")
        if name in weights:
            raise PairsError(f"--metric {name} given twice")
        try:
            weight = float(value)
        except ValueError:
            raise PairsError(f"--metric {spec!r}: the weight must be a number") from None
        if not math.isfinite(weight):
            raise PairsError(f"--metric {spec!r}: the weight must be finite")
        weights[name] = weight
    if not any(weights.values()):
        raise PairsError("--metric: every weight is 0, nothing ranks the candidates")
    return weights


@dataclass(frozen=True)
class Rule:
    weights: Mapping[str, float]
    min_margin: float = 0.0
    name: str = "best-vs-worst"

    def __post_init__(self) -> None:
        if self.name not in RULES:
            raise PairsError(f"--rule {self.name!r}: choose one of {', '.join(RULES)}")
        if not (math.isfinite(self.min_margin) and self.min_margin >= 0):
            raise PairsError(f"--min-margin {self.min_margin}: must be a finite number >= 0")

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "weights": dict(self.weights), "min_margin": self.min_margin}

    def combined(self, scores: Mapping[str, float]) -> float | None:
        """sum weight * score over the weighted metrics; None when one is missing or not finite."""
        values = [scores.get(name) for name in self.weights]
        if any(not isinstance(v, (int, float)) or not math.isfinite(v) for v in values):
            return None
        return float(sum(w * v for w, v in zip(self.weights.values(), values)))

    def select(self, candidates: Sequence[Mapping[str, Any]]
               ) -> tuple[dict | None, dict | None, float | None, str | None]:
        """(chosen, rejected, margin, None) or (None, None, margin or None, skip reason) over a prompt's candidate
        lines (k order); chosen / rejected are the first best / worst by k."""
        scored = [(c["combined"], c) for c in candidates if c.get("combined") is not None]
        if len(scored) < 2:
            return None, None, None, "too_few_scored"
        best = max(scored, key=lambda s: s[0])
        worst = min(scored, key=lambda s: s[0])
        margin = best[0] - worst[0]
        if margin <= 0:
            return None, None, 0.0, "tie"
        if margin < self.min_margin:
            return None, None, margin, "margin_below_min"
        return best[1], worst[1], margin, None


@dataclass(frozen=True)
class Selection:
    """Targeted pairs (DPO-2): of the pool's prompts, keep only the ``worst`` N where the model does worst.

    ``by="best"``: the lowest best-candidate combined score (even its best try is poor); ``by="spread"``: the
    largest best - worst (the model is unreliable there). Only prompts with two or more scored candidates (those
    that can give a pair) are ranked; ties keep pool order. A pure function of the recorded scores, so a rerun over
    the same folder selects the same prompts."""

    worst: int
    by: str = "best"

    def __post_init__(self) -> None:
        if self.by not in SELECT_BY:
            raise PairsError(f"--select-by {self.by!r}: choose one of {', '.join(SELECT_BY)}")
        if isinstance(self.worst, bool) or not isinstance(self.worst, int) or self.worst < 1:
            raise PairsError(f"--select-worst {self.worst}: must be an integer >= 1")

    def to_json(self) -> dict[str, Any]:
        return {"worst": self.worst, "by": self.by}

    def score(self, candidates: Sequence[Mapping[str, Any]]) -> float | None:
        """The prompt's ranking score (lower = worse for "best", higher = worse for "spread"); None: unrankable."""
        scored = [c["combined"] for c in candidates if c.get("combined") is not None]
        if len(scored) < 2:
            return None
        return max(scored) if self.by == "best" else max(scored) - min(scored)

    def choose(self, by_prompt: Mapping[str, Sequence[Mapping[str, Any]]]) -> tuple[list[str], dict[str, Any]]:
        """(selected ids, worst first; the report's "selection": rule, N, pool size, threshold, selected ids)."""
        ranked = [(pid, s) for pid, s in ((pid, self.score(c)) for pid, c in by_prompt.items()) if s is not None]
        ranked.sort(key=lambda item: item[1] if self.by == "best" else -item[1])  # stable: ties keep pool order
        chosen = ranked[:self.worst]
        info = {"by": self.by, "worst": self.worst, "pool": len(by_prompt), "rankable": len(ranked),
                "unrankable": len(by_prompt) - len(ranked), "selected": len(chosen),
                "keeps_all": self.worst >= len(ranked),
                "threshold": chosen[-1][1] if chosen else None,  # the last selected prompt's score
                "rule": ("lowest best-candidate combined score" if self.by == "best" else
                         "largest combined-score spread (best - worst candidate)"),
                "selected_ids": [pid for pid, _ in chosen], "scores": {pid: s for pid, s in chosen}}
        return info["selected_ids"], info


# --- scoring -------------------------------------------------------------------------------------------------
class Scorer:
    """The loaded metric models (eval/tta.MetricModels) -> every score of a wav file against its caption."""

    def __init__(self, models):
        self.models = models
        self._text: dict[str, np.ndarray] = {}

    @classmethod
    def load(cls, paths: Mapping[str, str | None], device: str = "cpu", clap_tokenizer: str | None = None,
             clap_seed: int = 0) -> Scorer:
        from ualm_nemo.eval import tta

        metrics = [m for m in ("clap", "aes") if paths.get(m)]
        return cls(tta.load_models(metrics, paths, device, clap_tokenizer=clap_tokenizer, clap_seed=clap_seed))

    def scores(self, audio: Path, caption: str) -> dict[str, float]:
        from ualm_nemo.eval import audio_prep

        wav, rate = audio_prep.read_audio(audio)
        out: dict[str, float] = {}
        if self.models.clap is not None:
            from ualm_nemo.eval.clap_score import cosine

            if caption not in self._text:
                self._text = {caption: self.models.clap.text_embeddings([caption])[0]}  # a prompt's K share it
            out["clap"] = cosine(self.models.clap.audio_embedding(wav, rate), self._text[caption])
        if self.models.aes is not None:
            out.update({f"aes_{axis.lower()}": value for axis, value in self.models.aes.scores(wav, rate).items()})
        return out


def required_models(weights: Mapping[str, float]) -> list[str]:
    return list(dict.fromkeys(MODEL_OF[m] for m in weights))


# --- the output folder ---------------------------------------------------------------------------------------
@dataclass
class Plan:
    todo: list[Prompt]
    kept: list[dict]  # candidates.jsonl lines kept (finished prompts), in file order
    done: int = 0  # prompts of this input already finished
    rewrite: bool = False
    notes: list[str] = field(default_factory=list)


class PairsFolder:
    """A run's hold on its output folder (a context manager: the lock is released on exit).

    Use: ``check_settings`` and ``plan`` (read only), load the models, ``prepare(plan)`` (the first write), then
    ``add_prompt`` per finished prompt, and ``finish`` (pairs.jsonl and report.json)."""

    def __init__(self, path: str | Path, settings: Mapping[str, Any], flags: Mapping[str, str] | None = None):
        self.path = Path(path)
        self.settings = json.loads(json.dumps(dict(settings)))  # as it reads back from the file
        self.flags = dict(flags or {})
        self.num_candidates = int(self.settings["num_candidates"])
        self._lock_fd: int | None = None

    def __enter__(self) -> PairsFolder:
        if self.path.exists() and not self.path.is_dir():
            raise PairsError(f"--output {self.path}: exists and is not a folder")
        if self.path.is_dir():
            self._lock()
        return self

    def __exit__(self, *exc_info) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def check_settings(self) -> None:
        """Refuse a folder written with other settings (SettingsConflict), or one this command did not write."""
        path = self.path / SETTINGS_FILE
        if not path.is_file():
            if (self.path / CANDIDATES).exists():
                raise SettingsConflict(f"{self.path} holds {CANDIDATES} but no {SETTINGS_FILE}: not a folder of "
                                       "this command; use a new --output")
            return
        try:
            recorded = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, OSError) as err:
            raise SettingsConflict(f"{path}: unreadable ({err}); use a new --output") from None
        old, new = _flatten(recorded), _flatten(self.settings)
        differ = [k for k in dict.fromkeys([*new, *old]) if old.get(k) != new.get(k)]
        if differ:
            changes = "; ".join(f"{self._flag(k)}: written with {old.get(k)!r}, this run {new.get(k)!r}"
                                for k in differ)
            raise SettingsConflict(f"{self.path} was written with other settings ({changes}). To resume, rerun "
                                   f"with the recorded settings ({path}); to start over, use a new --output or "
                                   "delete the folder")

    def _flag(self, key: str) -> str:
        """The flag of a flattened settings key (``flags`` holds keys or their dotted prefixes)."""
        parts = key.split(".")
        for end in range(len(parts), 0, -1):
            prefix = ".".join(parts[:end])
            if prefix in self.flags:
                return self.flags[prefix] + ("" if end == len(parts) else " " + ".".join(parts[end:]))
        return key

    def read_candidates(self) -> tuple[list[dict], bool, list[str]]:
        """(lines, needs a rewrite, notes); a torn last line is dropped, a bad line elsewhere is a conflict."""
        path = self.path / CANDIDATES
        if not path.is_file():
            return [], False, []
        content = path.read_bytes()
        raw = content.split(b"\n")
        if raw[-1] == b"":
            raw.pop()
        lines, notes = [], []
        rewrite = bool(content) and not content.endswith(b"\n")
        for number, line in enumerate(raw, 1):
            try:
                entry = json.loads(line.decode("utf-8"))
                if not isinstance(entry, dict) or not isinstance(entry.get("prompt_id"), str) or \
                        not isinstance(entry.get("k"), int) or "scores" not in entry or "prompt" not in entry:
                    raise ValueError("not a candidate line")
            except ValueError:
                if number == len(raw):  # the line being appended when a run was killed
                    notes.append(f"{path}:{number}: incomplete last line (interrupted run), ignored")
                    rewrite = True
                    continue
                raise SettingsConflict(f"{path}:{number} is not a candidate line of this command") from None
            lines.append(entry)
        return lines, rewrite, notes

    def plan(self, prompts: Sequence[Prompt]) -> Plan:
        lines, rewrite, notes = self.read_candidates()
        by_prompt: dict[str, dict[int, dict]] = {}
        for entry in lines:
            if entry["prompt_id"] in by_prompt and entry["k"] in by_prompt[entry["prompt_id"]]:
                rewrite = True  # a repeated line: the later one counts
            by_prompt.setdefault(entry["prompt_id"], {})[entry["k"]] = entry
        finished = {pid for pid, cands in by_prompt.items() if self._finished(cands)}
        conflicts = []
        for prompt in prompts:
            if prompt.id in finished:
                first = by_prompt[prompt.id][0]
                if first["prompt"] != prompt.messages or first.get("caption") != prompt.caption:
                    conflicts.append(prompt.id)
        if conflicts:
            shown = ", ".join(conflicts[:5]) + (", ..." if len(conflicts) > 5 else "")
            raise SettingsConflict(f"{self.path / CANDIDATES} holds finished prompts under {len(conflicts)} of these "
                                   f"ids with another prompt or caption ({shown}); use a new --output or other ids")
        kept = [e for e in lines if e["prompt_id"] in finished]
        kept_once, seen = [], set()
        for entry in reversed(kept):  # the last line per (prompt, k), in file order
            key = (entry["prompt_id"], entry["k"])
            if key not in seen:
                seen.add(key)
                kept_once.append(entry)
        kept_once.reverse()
        rewrite = rewrite or len(kept_once) != len(lines)  # unfinished prompts' lines dropped (redone)
        todo = [p for p in prompts if p.id not in finished]
        return Plan(todo, kept_once, len(prompts) - len(todo), rewrite, notes)

    def _finished(self, cands: Mapping[int, dict]) -> bool:
        if set(cands) != set(range(self.num_candidates)):
            return False
        return all(entry.get("codes") is None or (_codes_ok(self.path / entry["codes"]) and
                                                  _wav_ok(self.path / entry["audio"])) for entry in cands.values())

    def prepare(self, plan: Plan) -> None:
        """The first write: folder made and locked, temporary files removed, settings recorded, the candidate
        lines rewritten (atomically) when some were dropped."""
        self.path.mkdir(parents=True, exist_ok=True)
        if self._lock_fd is None:
            self._lock()
        (self.path / CANDIDATE_DIR).mkdir(exist_ok=True)
        for leftover in (self.path / CANDIDATE_DIR).glob("*/.*.partial"):
            leftover.unlink()
        if not (self.path / SETTINGS_FILE).is_file():  # else check_settings found the same ones there
            _write_atomic(self.path / SETTINGS_FILE, json.dumps(self.settings, indent=1) + "\n")
        if plan.rewrite:
            _write_atomic(self.path / CANDIDATES, "".join(_line(e) for e in plan.kept))
        self._kept = list(plan.kept)

    def add_prompt(self, prompt: Prompt, replies: Sequence, seeds: Sequence[int], scorer: Scorer,
                   rule: Rule) -> list[dict]:
        """Prompt's K replies -> codes and wavs written (atomically), scored, then their K lines appended and
        flushed to disk. Returns the lines."""
        from ualm_nemo.eval.audio_prep import AudioError
        from ualm_nemo.inference.jobs import write_wav

        folder = self.path / CANDIDATE_DIR / prompt.id
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for k, (reply, seed) in enumerate(zip(replies, seeds)):
            entry: dict[str, Any] = {"prompt_id": prompt.id, "k": k, "seed": seed, "codes": None, "audio": None,
                                     "scores": {}, "combined": None}
            response: list[dict[str, str]] = []
            audio = reply.audio[0] if reply.audio else None
            if audio is not None:
                codes = audio.codes.detach().cpu().numpy()
                if codes.ndim != 2 or codes.min() < 0 or codes.max() > np.iinfo(np.int16).max:
                    raise RuntimeError(f"prompt {prompt.id} candidate {k}: codes {codes.shape} do not fit int16 [F, N]")
                relative = f"{CANDIDATE_DIR}/{prompt.id}/{k}"
                _save_npy(folder, str(k), codes.astype(np.int16))
                write_wav(folder, str(k), audio.wav, audio.sample_rate)
                entry.update(codes=f"{relative}.npy", audio=f"{relative}.wav", frames=int(codes.shape[0]),
                             sample_rate=audio.sample_rate)
                try:
                    entry["scores"] = scorer.scores(self.path / entry["audio"], prompt.caption)
                except AudioError as err:  # a clip the metrics cannot read: kept, not ranked (counted unscored)
                    entry["skipped"] = str(err)
                entry["combined"] = rule.combined(entry["scores"])
            else:
                entry["skipped"] = f"no audio (stop={reply.stop!r})"
            for part in reply.parts:  # the assistant turn as written: text and (at most one) audio, in order
                if isinstance(part, str):
                    response.append({"text": part})
                elif part is audio:
                    response.append({"codes": entry["codes"]})
            entry.update(response=response, stop=reply.stop, prompt=prompt.messages, caption=prompt.caption)
            lines.append(entry)
        with open(self.path / CANDIDATES, "a", encoding="utf-8") as f:
            f.write("".join(_line(e) for e in lines))  # only once every file of the prompt is in place
            f.flush()
            os.fsync(f.fileno())
        self._kept += lines
        return lines

    def finish(self, rule: Rule, metric_models: Mapping[str, Any], this_run: Mapping[str, int],
               selection: Selection | None = None) -> dict:
        """pairs.jsonl and report.json from every finished prompt's lines (written atomically); -> the report.
        Called once every prompt of the run is scored, so a ``selection`` ranks the whole pool."""
        pairs, report = build_pairs(self._kept, rule, selection)
        _write_atomic(self.path / PAIRS, "".join(_line(p) for p in pairs))
        report.update(this_run=dict(this_run), metric_models=dict(metric_models), settings=self.settings)
        _write_atomic(self.path / REPORT, json.dumps(report, indent=1) + "\n")
        return report

    def _lock(self) -> None:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise PairsError(f"another run is writing to {self.path}: wait for it to finish, or use another "
                                 "--output") from None
            return  # a file system without locks: run unlocked
        self._lock_fd = fd


def build_pairs(lines: Iterable[Mapping[str, Any]], rule: Rule, selection: Selection | None = None
                ) -> tuple[list[dict], dict]:
    """Candidate lines (any order) -> (pair records in first-seen prompt order, report counts). With a
    ``selection``, only its prompts are paired (the skip counts are theirs; report["selection"] says how)."""
    by_prompt: dict[str, list[Mapping[str, Any]]] = {}
    for entry in lines:
        by_prompt.setdefault(entry["prompt_id"], []).append(entry)
    chosen_info = None
    pool = by_prompt
    if selection is not None:
        selected, chosen_info = selection.choose(by_prompt)
        keep = set(selected)
        pool = {pid: cands for pid, cands in by_prompt.items() if pid in keep}
    pairs: list[dict] = []
    skipped: dict[str, list[str]] = {reason: [] for reason in SKIP_REASONS}
    margins: list[float] = []
    for prompt_id, cands in pool.items():
        cands = sorted(cands, key=lambda c: c["k"])
        chosen, rejected, margin, reason = rule.select(cands)
        if reason is not None:
            skipped[reason].append(prompt_id)
            continue
        margins.append(margin)
        pairs.append({"id": prompt_id, "prompt": cands[0]["prompt"], "chosen": chosen["response"],
                      "rejected": rejected["response"],
                      "scores": {"chosen": {**chosen["scores"], "combined": chosen["combined"]},
                                 "rejected": {**rejected["scores"], "combined": rejected["combined"]},
                                 "rule": rule.name, "margin": margin}})
    all_lines = [c for cands in by_prompt.values() for c in cands]
    report = {
        "prompts": len(by_prompt), "candidates": len(all_lines),
        "candidates_without_audio": sum(c.get("codes") is None for c in all_lines),
        "candidates_unscored": sum(c.get("codes") is not None and c.get("combined") is None for c in all_lines),
        "pairs": len(pairs), "skipped": {reason: len(ids) for reason, ids in skipped.items()},
        "skipped_ids": {reason: ids[:MAX_REPORTED] for reason, ids in skipped.items() if ids},
        "margin": ({"mean": float(np.mean(margins)), "min": min(margins), "max": max(margins)} if margins else None),
        "rule": rule.to_json(),
        "selection": chosen_info,
    }
    return pairs, report


def generate(infer, cfg, folder: PairsFolder, todo: Sequence[Prompt], scorer: Scorer, rule: Rule, base_seed: int,
             mode: str, batch_size: int, progress: Callable[[int], Any] | None = None) -> int:
    """Every prompt of ``todo``: its K candidates sampled (as many prompts per ``reply`` call as ``batch_size``
    conversations hold, at least one), written, scored, listed. ``progress(n)``: n more prompts finished."""
    k_count = folder.num_candidates
    group = max(1, batch_size // k_count)
    for start in range(0, len(todo), group):
        chunk = todo[start:start + group]
        seeds = [[candidate_seed(base_seed, p.id, k) for k in range(k_count)] for p in chunk]
        replies = infer.reply([p.conversation() for p in chunk for _ in range(k_count)], mode,
                              [s for row in seeds for s in row], cfg)
        for index, prompt in enumerate(chunk):
            folder.add_prompt(prompt, replies[index * k_count:(index + 1) * k_count], seeds[index], scorer, rule)
        if progress is not None:
            progress(len(chunk))
    return len(todo)


# --- small helpers -------------------------------------------------------------------------------------------
def _flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _line(entry: Mapping[str, Any]) -> str:
    return json.dumps(entry, ensure_ascii=False) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _save_npy(folder: Path, stem: str, array: np.ndarray) -> None:
    tmp = folder / f".{stem}.npy.partial"
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / f"{stem}.npy")


def _codes_ok(path: Path) -> bool:
    try:
        codes = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return False
    return codes.dtype == np.int16 and codes.ndim == 2 and codes.shape[0] > 0


def _wav_ok(path: Path) -> bool:
    import soundfile

    try:
        return path.is_file() and soundfile.info(str(path)).frames > 0
    except RuntimeError:
        return False


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
