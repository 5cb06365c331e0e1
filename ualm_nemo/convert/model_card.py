"""The model card (``README.md``) of an exported HF folder, built from the model config, the files written and the
checkpoint's own record: nothing in it is hand-maintained text that could drift from the folder it describes.

:func:`model_card` is the one builder; :func:`usage_commands` gives the example command lines it shows (tests parse
them with the examples' real parsers); :func:`read_provenance` reads what the checkpoint recorded (step, the run's
data/train/optim sections, the import source, the tokenizer).
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import subprocess
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml

from ualm_nemo.convert.audio_parts import AUDIO_FILE, ENCODER_DIR, UALM_CONFIG_FILE
from ualm_nemo.convert.hf_folder import INDEX_FILE, TOKENIZER_FILES, read_header
from ualm_nemo.model.config import UALMConfig
from ualm_nemo.model.vocab import SPECIALS

log = logging.getLogger(__name__)
CARD_FILE = "README.md"
CODEC_PLACEHOLDER = "/models/xcodec-hubert-general"  # when the run recorded no data.codec_path
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_MAX_INIT_CHAIN = 8  # train.init_from links followed back to the import (a cycle cannot loop)


@dataclass(frozen=True)
class Provenance:
    """Where an export came from: what the checkpoint's ``ualm_common.pt`` recorded, and when/what exported it."""

    checkpoint: str | None = None  # the iter_* folder exported
    step: int | None = None
    run_config: dict[str, Any] | None = None  # the run's data / train / optim sections (training records them)
    imported_from: dict[str, Any] | None = None  # the HF folder the weights were first imported from
    chain: list[str] = field(default_factory=list)  # earlier checkpoints reached through train.init_from
    tokenizer: str | None = None  # the tokenizer the export carries ("byte" or a folder)
    exported_at: str = field(default_factory=lambda: datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    version: str = ""
    git_commit: str | None = None


def ualm_nemo_version() -> tuple[str, str | None]:
    """(package version, git commit of the checkout when it is one; None otherwise: an installed wheel)."""
    import ualm_nemo

    root = Path(ualm_nemo.__file__).resolve().parents[1]
    try:
        done = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=False)
        commit = done.stdout.strip() if done.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return ualm_nemo.__version__, commit or None


def _common(iteration: Path) -> dict[str, Any]:
    """An iteration's record; {} (and a warning) when it is missing or unreadable: a card detail never stops an
    export (the exported iteration's own record was read before, by prepare_export)."""
    path = iteration / "ualm_common.pt"
    try:
        return torch.load(path, weights_only=False) if path.is_file() else {}
    except Exception as err:  # noqa: BLE001 - a truncated pickle raises anything from EOFError to RuntimeError
        log.warning("model card: %s is unreadable (%s): its provenance is left out", path, type(err).__name__)
        return {}


def read_provenance(iteration: str | Path, tokenizer: str | Path | None) -> Provenance:
    """The record of ``iteration`` (an iter_* folder); ``train.init_from`` is followed back to an import's source
    as far as those checkpoints are still on this machine."""
    from ualm_nemo.distributed.checkpoint import resolve_checkpoint

    iteration = Path(iteration).resolve()
    common = _common(iteration)
    imported, chain, seen = common.get("imported_from"), [], {iteration}
    init_from = (common.get("run_config") or {}).get("train", {}).get("init_from")
    while imported is None and init_from and len(chain) < _MAX_INIT_CHAIN:
        try:
            earlier = resolve_checkpoint(init_from).resolve()
        except (OSError, ValueError) as err:  # gone, or damaged since (DamagedCheckpointError): named, not fatal
            chain.append(f"{init_from} (not readable here: {type(err).__name__})")
            break
        if earlier in seen:
            break
        seen.add(earlier)
        earlier_common = _common(earlier)
        chain.append(f"{earlier} (step {earlier_common.get('step', '?')})")
        imported = earlier_common.get("imported_from")
        init_from = (earlier_common.get("run_config") or {}).get("train", {}).get("init_from")
    version, commit = ualm_nemo_version()
    return Provenance(checkpoint=str(iteration), step=common.get("step"), run_config=common.get("run_config"),
                      imported_from=imported, chain=chain, tokenizer=None if tokenizer is None else str(tokenizer),
                      version=version, git_commit=commit)


def _source_front_matter(provenance: Provenance) -> dict[str, Any]:
    """license and base_model as the import's source folder states them (its README front matter, its config's
    hub name); empty when unknown."""
    source = Path((provenance.imported_from or {}).get("hf") or "/nonexistent")
    found: dict[str, Any] = {}
    readme = source / CARD_FILE
    if readme.is_file():
        parts = readme.read_text(encoding="utf-8", errors="replace").split("---", 2)
        try:
            meta = yaml.safe_load(parts[1]) if len(parts) == 3 and not parts[0].strip() else None
        except yaml.YAMLError:
            meta = None
        if isinstance(meta, dict) and isinstance(meta.get("license"), str):
            found["license"] = meta["license"]
    try:
        name = json.loads((source / "config.json").read_text()).get("_name_or_path", "")
    except (OSError, ValueError, AttributeError):
        name = ""
    if isinstance(name, str) and _HUB_ID.match(name) and not Path(name).exists():
        found["base_model"] = name
    return found


def front_matter(cfg: UALMConfig, provenance: Provenance) -> dict[str, Any]:
    """The card's YAML header (the Hub reads it): license ``other`` unless the import's source states one."""
    tags = ["ualm", "ualm_nemo", "qwen2", "audio-language-model", "text-to-audio"]
    if cfg.audio_in.enabled:
        tags.append("audio-understanding")
    return {"library_name": "transformers", "tags": tags, "license": "other",
            **_source_front_matter(provenance)}


def vocabulary_rows(cfg: UALMConfig) -> list[tuple[str, str]]:
    """(ids, meaning) of the unified vocabulary, from model/vocab.py's arithmetic."""
    v = cfg.vocab
    rows = [(f"0 - {v.text_vocab_size - 1}", "text tokenizer ids (rows of `model.safetensors`: the Qwen2 part)")]
    # a table cell: the specials' pipes escaped (GFM splits cells on them, code spans too)
    rows += [(str(v.special_id(name)), f"`{name.replace('|', chr(92) + '|')}` (UALM special; row of `{AUDIO_FILE}`)")
             for name in SPECIALS]
    for n in range(v.num_codebooks):
        rows.append((f"{v.codebook_start(n)} - {v.audio_pad_id(n)}",
                     f"codec stream {n}: codes 0 - {v.codebook_size - 1}, then its pad {v.audio_pad_id(n)}"))
    return rows


FILE_ROLES = {
    "config.json": "Qwen2 config of the text part (`Qwen2ForCausalLM`)",
    "generation_config.json": "transformers generation defaults of the text part",
    "model.safetensors": "the Qwen2 weights: text rows of the embedding and output head",
    INDEX_FILE: "the shard index of the Qwen2 weights",
    AUDIO_FILE: "UALM's own tensors: special and audio rows of embedding and head, stream heads, audio adapter",
    ENCODER_DIR + "/": "the frozen audio encoder (an encoder-only HF folder: config.json + safetensors)",
    UALM_CONFIG_FILE: "the full UALM model config (ualm_nemo's `UALMConfig`)",
    CARD_FILE: "this card",
}


def folder_files(folder: Path) -> list[tuple[str, str]]:
    """(name, role) of every entry of the folder, sorted; shards and tokenizer files by their pattern."""
    rows = []
    for path in sorted(folder.iterdir()):
        name = path.name + ("/" if path.is_dir() else "")
        role = FILE_ROLES.get(name)
        if role is None and re.fullmatch(r"model-\d+-of-\d+\.safetensors", name):
            role = "a shard of the Qwen2 weights"
        if role is None and (name in TOKENIZER_FILES or name in ("added_tokens.json", "chat_template.jinja")):
            role = "tokenizer (transformers `AutoTokenizer`)"
        rows.append((name, role or ""))
    return rows


def parameter_counts(folder: Path) -> dict[str, int]:
    """Parameters per part, read from the safetensors headers written (not estimated)."""
    def count(files) -> int:
        total = 0
        for file in files:
            header, _ = read_header(file)
            total += sum(int(torch.Size(info["shape"]).numel()) for key, info in header.items()
                         if key != "__metadata__")
        return total

    return {"text (Qwen2)": count(sorted(folder.glob("model*.safetensors"))),
            "audio rows, heads, adapter": count([folder / AUDIO_FILE] if (folder / AUDIO_FILE).is_file() else []),
            "audio encoder": count(sorted((folder / ENCODER_DIR).glob("*.safetensors")))}


def usage_commands(folder: str | Path, cfg: UALMConfig, provenance: Provenance,
                   has_tokenizer: bool) -> list[tuple[str, list[str]]]:
    """(what it does, argv after ``python``) of the examples that take this folder, run from a ualm_nemo checkout."""
    f = str(folder)
    codec = ((provenance.run_config or {}).get("data") or {}).get("codec_path") or CODEC_PLACEHOLDER
    model = ["--checkpoint", f, "--tokenizer", f if has_tokenizer else "/models/Qwen2.5-7B-Instruct"]
    commands = [("text-to-audio: one wav per caption", ["examples/generate.py", *model, "--codec", codec,
                 "--caption", "a dog barks twice in a large hall", "--out-dir", "generated"]),
                ("chat: the model answers in text or audio", ["examples/chat.py", "chat", *model, "--codec", codec,
                 "--say", "make me a rain sound"])]
    if cfg.audio_in.enabled:
        commands += [("answer a question about an audio file", ["examples/chat.py", "understand", *model,
                      "--audio", "clip.wav", "--question", "What is making this sound?"]),
                     ("audio question answering benchmark (MMAU)", ["examples/evaluate.py", "understanding",
                      "--benchmark", "mmau", "--data", "mmau-test-mini.json", *model, "--out-dir", "eval/mmau"])]
    commands.append(("text benchmarks (lm_eval) on the Qwen2 part", ["examples/evaluate.py", "text", "--hf", f,
                     "--mmlu", "mmlu_test.jsonl", "--mmlu-dev", "mmlu_dev.jsonl", "--out-dir", "eval/text"]))
    return commands


def _yaml_block(data: Any) -> list[str]:
    return ["```yaml", yaml.safe_dump(data, sort_keys=False, default_flow_style=False).rstrip(), "```"]


def _describe(cfg: UALMConfig, folder: Path) -> list[str]:
    b, v, counts = cfg.backbone, cfg.vocab, parameter_counts(folder)
    hf_config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    written = hf_config.get("dtype") or hf_config.get("torch_dtype") or "?"
    audio_in = ("audio in through the frozen audio encoder and a "
                f"{cfg.audio_in.adapter} adapter ({cfg.audio_in.num_mel_bins} mel bins)" if cfg.audio_in.enabled
                else "no audio input (model.audio_in.enabled=false)")
    return ["UALM, a unified audio language model: one decoder for text, audio understanding and text-to-audio. "
            f"Text and {v.num_codebooks} codec streams ({v.codebook_size} codes each, delay pattern) share the "
            f"sequence; {audio_in}; audio out through a `{cfg.audio_out.head}` stream head.", "",
            f"Backbone (Qwen2-shaped): {b.num_layers} layers, hidden {b.hidden_size}, FFN {b.ffn_hidden_size}, "
            f"{b.num_attention_heads} attention heads, {b.num_query_groups} KV groups, RoPE base {b.rope_base:g}, "
            f"{b.max_position_embeddings} positions; weights `{cfg.params_dtype}` in training, written as `{written}`.", "",
            "Parameters (from the files): " + ", ".join(f"{k} {n:,}" for k, n in counts.items())
            + f"; total {sum(counts.values()):,}."]


def _provenance_lines(cfg: UALMConfig, provenance: Provenance) -> list[str]:
    p = provenance
    lines = [f"- checkpoint: `{p.checkpoint or 'not recorded'}`",
             f"- step: {'not recorded' if p.step is None else p.step}"]
    lines += [f"- started from (`train.init_from`): `{link}`" for link in p.chain]
    if p.imported_from:
        lines.append(f"- first imported from the HF folder `{p.imported_from.get('hf')}` "
                     f"(new audio rows: {p.imported_from.get('new_rows_init', 'n/a')})")
    lines += [f"- tokenizer: `{p.tokenizer or 'none given (no tokenizer files in this folder)'}`",
              f"- exported: {p.exported_at} with ualm_nemo {p.version or '?'}"
              + (f" (git commit `{p.git_commit}`)" if p.git_commit else ""), "", "Model config (`model.*`):", ""]
    lines += _yaml_block({k: v for k, v in asdict(cfg).items() if k not in ("parallel", "recompute", "fp8")})
    if p.run_config:
        lines += ["", "Run config the checkpoint recorded (`data.*`, `train.*`, `optim.*`):", ""]
        lines += _yaml_block(p.run_config)
    else:
        lines += ["", "The checkpoint records no run config (an import, or saved before ualm_nemo recorded it)."]
    return lines


def model_card(folder: Path, out: str | Path, cfg: UALMConfig, provenance: Provenance) -> str:
    """The card's text for the files in ``folder`` (being written; ``out`` is where it will be)."""
    files = sorted({*folder_files(folder), (CARD_FILE, FILE_ROLES[CARD_FILE])})  # the card is written after
    has_tokenizer = any(name in TOKENIZER_FILES for name, _ in files)
    b = cfg.backbone
    lines = ["---", yaml.safe_dump(front_matter(cfg, provenance), sort_keys=False).rstrip(), "---", "",
             f"# UALM ({b.num_layers} layers, hidden {b.hidden_size}), exported by ualm_nemo", ""]
    lines += _describe(cfg, folder)
    lines += ["", "## Vocabulary", "",
              f"One id space of {cfg.vocab.size} ids: the text tokenizer's ids unchanged, then the UALM specials, then "
              f"{cfg.vocab.num_codebooks} codec streams of {cfg.vocab.codebook_span} ids (codes, then the stream's "
              f"pad, embedded as zero). Stream 0 carries text or codebook 0; streams 1 - {cfg.vocab.num_codebooks - 1} "
              "carry the other codebooks or their pads.", "", "| ids | meaning |", "|---|---|"]
    lines += [f"| {ids} | {meaning} |" for ids, meaning in vocabulary_rows(cfg)]
    lines += ["", "## Files", "", "| file | what |", "|---|---|"]
    lines += [f"| `{name}` | {role} |" for name, role in files]
    lines += ["", "## Use", "", "The text part loads with transformers alone (ids below "
              f"{b.text_vocab_size}; it reads and writes text only):", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f"tokenizer = AutoTokenizer.from_pretrained({str(out)!r})",
              f"model = AutoModelForCausalLM.from_pretrained({str(out)!r})", "```", "",
              "Audio generation and audio questions need ualm_nemo (`ualm_nemo.inference.hf_model."
              "UALMForConditionalGeneration.from_pretrained(folder)` loads every part); from a ualm_nemo checkout:",
              "", "```bash"]
    for what, argv in usage_commands(out, cfg, provenance, has_tokenizer):
        lines += [f"# {what}", "python " + shlex.join(argv)]
    lines += ["```", "", "## Provenance", ""]
    lines += _provenance_lines(cfg, provenance)
    return "\n".join(lines) + "\n"


def write_model_card(folder: Path, out: str | Path, cfg: UALMConfig, provenance: Provenance | None) -> Path:
    """``folder/README.md`` (``folder`` is the export's temporary folder: the card is published with the rest)."""
    path = folder / CARD_FILE
    path.write_text(model_card(folder, out, cfg, provenance or Provenance(version=ualm_nemo_version()[0])),
                    encoding="utf-8")
    return path
