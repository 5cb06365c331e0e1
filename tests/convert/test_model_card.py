"""The model card (README.md) every HF export carries: its YAML front matter parses, its vocabulary table is the
exported model's, its provenance names the checkpoint and step, and every command it shows is accepted by the
real parser of that example script."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from ualm_nemo.convert.hf_folder import read_header
from ualm_nemo.convert.model_card import CARD_FILE, model_card, read_provenance
from ualm_nemo.model.config import UALMConfig
from ualm_nemo.model.vocab import SPECIALS
from ualm_nemo.testing.examples import Parsed, load_example, parse_only
from ualm_nemo.training.run_config import recorded_run_config, run_config_from_dict


def _card(folder: Path) -> str:
    return (folder / CARD_FILE).read_text(encoding="utf-8")


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


def _vocab_table(card: str) -> dict[str, str]:
    """meaning -> ids of the card's vocabulary table."""
    section = card.split("## Vocabulary", 1)[1].split("## ", 1)[0]
    rows = [line.split(" | ") for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    return {meaning.rstrip(" |"): ids.lstrip("| ") for ids, meaning in rows[1:]}


def _commands(card: str) -> list[list[str]]:
    block = card.split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line)[1:] for line in block.splitlines() if line.startswith("python ")]


def test_the_export_carries_a_card_with_the_models_numbers(tiny_export):
    hf = tiny_export["hf"]
    card = _card(hf)
    meta = _front_matter(card)
    assert meta["library_name"] == "transformers" and "ualm" in meta["tags"] and meta["license"]
    assert "written as `float32`" in card  # the tiny export keeps its fp32 weights
    cfg = UALMConfig.from_dict(json.loads((hf / "ualm_config.json").read_text()))
    # the numbers against the written files, not only against the config the card was made from
    text_rows = json.loads((hf / "config.json").read_text())["vocab_size"]
    audio_rows = read_header(hf / "audio.safetensors")[0]["embedding.audio"]["shape"][0]
    specials = read_header(hf / "audio.safetensors")[0]["embedding.specials"]["shape"][0]
    assert f"One id space of {text_rows + specials + audio_rows} ids" in card
    table = _vocab_table(card)
    assert table["text tokenizer ids (rows of `model.safetensors`: the Qwen2 part)"] == f"0 - {text_rows - 1}"
    for i, name in enumerate(SPECIALS):
        assert table[f"`{name.replace('|', chr(92) + '|')}` (UALM special; row of `audio.safetensors`)"] == \
            str(text_rows + i) == str(cfg.vocab.special_id(name))
    span = audio_rows // cfg.audio_out.num_codebooks
    for n in range(cfg.audio_out.num_codebooks):
        first = text_rows + specials + n * span
        assert table[f"codec stream {n}: codes 0 - {span - 2}, then its pad {first + span - 1}"] == \
            f"{first} - {first + span - 1}"
        assert first + span - 1 == cfg.vocab.audio_pad_id(n)
    # provenance: the iteration exported, its step, the import's source; every file of the folder listed
    assert f"- checkpoint: `{(tiny_export['ckpt'] / 'iter_0000000').resolve()}`" in card
    assert "- step: 0\n" in card
    assert f"first imported from the HF folder `{(tiny_export['root'] / 'qwen').resolve()}`" in card
    files = card.split("## Files", 1)[1].split("## ", 1)[0]
    for path in hf.iterdir():
        assert f"| `{path.name}{'/' if path.is_dir() else ''}` |" in files


@pytest.mark.parametrize("script", ["generate", "chat", "evaluate"])
def test_the_cards_commands_parse_with_the_examples_parsers(tiny_export, script, monkeypatch):
    commands = [argv for argv in _commands(_card(tiny_export["hf"])) if argv[0] == f"examples/{script}.py"]
    assert commands  # each script is shown at least once
    module = load_example(script)
    parse_only(monkeypatch)
    for argv in commands:
        with pytest.raises(Parsed):
            module.main(argv[1:])
        folder = argv[argv.index("--hf" if "--hf" in argv else "--checkpoint") + 1]
        assert Path(folder) == tiny_export["hf"].resolve()


def test_a_trained_runs_card_names_its_step_run_config_and_origin(tiny_export, tmp_path):
    """A run started (train.init_from) from the import: its step and data keys, and the chain back to the import."""
    iteration = shutil.copytree(tiny_export["ckpt"] / "iter_0000000", tmp_path / "checkpoints" / "iter_0000012")
    run = run_config_from_dict({"model": {"backbone": "tiny"}, "output_dir": str(tmp_path),
                                "data": {"tokenizer": "byte", "codec_path": "/models/my-xcodec", "seq_len": 1024},
                                "train": {"init_from": str(tiny_export["ckpt"])}})
    common = torch.load(iteration / "ualm_common.pt", weights_only=False)
    common.pop("imported_from")
    torch.save({**common, "step": 12, "run_config": recorded_run_config(run)}, iteration / "ualm_common.pt")

    provenance = read_provenance(iteration, "byte")
    cfg = UALMConfig.from_dict(json.loads((tiny_export["hf"] / "ualm_config.json").read_text()))
    card = model_card(tiny_export["hf"], "/models/ualm-hf", cfg, provenance)
    assert f"- checkpoint: `{iteration.resolve()}`" in card and "- step: 12\n" in card
    assert f"started from (`train.init_from`): `{(tiny_export['ckpt'] / 'iter_0000000').resolve()} (step 0)`" in card
    assert f"first imported from the HF folder `{(tiny_export['root'] / 'qwen').resolve()}`" in card
    recorded = yaml.safe_load(card.split("Run config the checkpoint recorded", 1)[1].split("```yaml\n", 1)[1]
                              .split("```", 1)[0])
    assert recorded["data"]["seq_len"] == 1024 and recorded["train"]["init_from"] == str(tiny_export["ckpt"])
    assert all("--codec /models/my-xcodec" in shlex.join(argv) for argv in _commands(card) if "--codec" in argv)
    assert re.search(r"exported: \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ with ualm_nemo \d", card)


def test_an_unreadable_earlier_checkpoint_leaves_its_provenance_out(tiny_export, tmp_path):
    """train.init_from names a checkpoint whose record is truncated: the card says so, the export goes on."""
    earlier = shutil.copytree(tiny_export["ckpt"] / "iter_0000000", tmp_path / "earlier" / "iter_0000005")
    (earlier / "ualm_common.pt").write_bytes((earlier / "ualm_common.pt").read_bytes()[:40])
    iteration = shutil.copytree(tiny_export["ckpt"] / "iter_0000000", tmp_path / "run" / "iter_0000009")
    common = torch.load(iteration / "ualm_common.pt", weights_only=False)
    common.pop("imported_from")
    run = run_config_from_dict({"model": {"backbone": "tiny"}, "train": {"init_from": str(earlier)}})
    torch.save({**common, "step": 9, "run_config": recorded_run_config(run)}, iteration / "ualm_common.pt")

    provenance = read_provenance(iteration, None)
    assert provenance.chain == [f"{earlier} (not readable here: DamagedCheckpointError)"]
    assert provenance.imported_from is None and provenance.step == 9
