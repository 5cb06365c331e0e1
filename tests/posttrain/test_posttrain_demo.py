"""The post-training recipe: self-reflection records hold the rows inference built, and the whole chain
(`make posttrain-demo`, shortened) runs: pre-train -> SFT-1 -> pairs -> reference -> DPO-1 -> reflection data ->
SFT-2 -> pairs -> reference -> DPO-2."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from ualm_nemo.testing.dist import run_distributed

pytestmark = pytest.mark.timeout(900)


def _transcript(seed: int = 0):
    """What reasoning.self_reflect records, by hand: plan, audio, listen (hearing that audio), critique, refined."""
    from ualm_nemo.inference.pipeline import ReplyAudio
    from ualm_nemo.inference.reasoning import CRITIQUE, ENRICH, GENERATE, LISTEN, REFINE
    from ualm_nemo.inference.transcript import Step, Transcript

    g = torch.Generator().manual_seed(seed)
    first = ReplyAudio(torch.randint(0, 1024, (6, 8), generator=g), codec_wav=0.1 * torch.randn(4800, generator=g))
    refined = ReplyAudio(torch.randint(0, 1024, (4, 8), generator=g))
    t = Transcript("self-reflection", meta={"prompt": "a dog", "seed": seed})
    for step in (Step("user", "plan", ENRICH.format(prompt="a dog")), Step("assistant", "plan", "Keywords: dog"),
                 Step("user", "audio", GENERATE), Step("assistant", "audio", "", audio=[first]),
                 Step("user", "listen", LISTEN, audio=[first]), Step("assistant", "listen", "Keywords: bark"),
                 Step("user", "critique", CRITIQUE), Step("assistant", "critique", "Too short."),
                 Step("user", "refined audio", REFINE), Step("assistant", "refined audio", "", audio=[refined])):
        t.add(step)
    return t, first, refined


def test_reflection_record_holds_the_rows_inference_built(tmp_path):
    """The SFT-2 sample of a record == the conversation self_reflect fed the model (tokens and heard log-mel),
    learned everywhere but the first, unrefined clip."""
    from ualm_nemo.data.formatting import AudioIn, AudioOut, SampleFormatter
    from ualm_nemo.data.posttrain_dataset import load_conversation_dataset
    from ualm_nemo.data.tokenizer import build_tokenizer
    from ualm_nemo.inference.reasoning import CRITIQUE, ENRICH, GENERATE, LISTEN, REFINE
    from ualm_nemo.model.vocab import UnifiedVocab
    from ualm_nemo.posttrain.reflection_data import write_reflection_manifest

    transcript, first, refined = _transcript()
    manifest = write_reflection_manifest([transcript], ["r0"], tmp_path)
    assert manifest.written == 1 and not manifest.skipped
    formatter = SampleFormatter(build_tokenizer("byte"), UnifiedVocab(text_vocab_size=320), cfg_dropout=0.0)
    dataset, rejects = load_conversation_dataset(manifest.path, formatter, None)
    assert not rejects
    sample = dataset[0]
    turns = [("user", [ENRICH.format(prompt="a dog")]), ("assistant", ["Keywords: dog"]), ("user", [GENERATE]),
             ("assistant", [AudioOut(first.codes)]), ("user", [AudioIn(first.codec_wav), "\n", LISTEN]),
             ("assistant", ["Keywords: bark"]), ("user", [CRITIQUE]), ("assistant", ["Too short."]),
             ("user", [REFINE]), ("assistant", [AudioOut(refined.codes)])]
    learn = [role == "assistant" and k != 3 for k, (role, _) in enumerate(turns)]
    expected = formatter.format_conversation(turns, random.Random(0), learn)
    assert torch.equal(sample["tokens"], expected["tokens"]) and torch.equal(sample["labels"], expected["labels"])
    assert torch.allclose(sample["audio_features"], expected["audio_features"], atol=1e-5)
    every_turn = formatter.format_conversation(turns, random.Random(0))
    assert (expected["labels"] != -100).sum() < (every_turn["labels"] != -100).sum()  # the first clip is not learned


def test_reflection_data_counts_what_it_cannot_use(tmp_path):
    from ualm_nemo.data.conversation import read_conversation_manifest
    from ualm_nemo.posttrain.reflection_data import write_reflection_manifest

    good, _, _ = _transcript(0)
    garbled, _, _ = _transcript(1)
    garbled.steps[5].text = "K\ufffd\ufffd"  # a model's undecodable bytes
    empty, _, _ = _transcript(2)
    empty.steps[7].text = " "
    fixed, _, _ = _transcript(3)
    fixed.steps[5].text = "\ufffd"
    out = write_reflection_manifest([good, garbled, empty, fixed], ["a", "b", "c", "d"], tmp_path,
                                    texts=[{}, {}, {}, {"listen": "Keywords: bark, dog"}])
    assert out.written == 2 and [i for i, _ in out.skipped] == ["b", "c"]
    assert "undecodable text (U+FFFD)" in out.skipped[0][1] and "turn 7 (assistant, critique) is empty" in out.skipped[1][1]
    read = read_conversation_manifest(out.path)
    assert [r.id for r in read.records] == ["a", "d"] and not read.rejects
    assert json.loads(out.path.read_text().splitlines()[1])["turns"][5]["content"] == [{"text": "Keywords: bark, dog"}]
    # resume: both files' ids are done; a torn last line (a killed run) is dropped and its prompt redone
    from ualm_nemo.posttrain.reflection_data import ReflectionFolder

    with open(out.path, "a") as f:
        f.write('{"id": "e", "tur')
    folder = ReflectionFolder(tmp_path)
    assert folder.done == {"a", "b", "c", "d"} and len(out.path.read_text().splitlines()) == 2
    with pytest.raises(ValueError, match="one new, unique id each"):
        folder.add([good], ["a"])
    assert folder.add([good], ["e"]).written == 1 and "e" in ReflectionFolder(tmp_path).done


def _chain(output_dir: str) -> dict:
    """The shortened demo, then examples/make_reflection_data.py twice on its DPO-1 model."""
    from ualm_nemo.posttrain.demo import DemoSizes, run_posttrain_demo

    result = run_posttrain_demo(output_dir, DemoSizes(pretrain_steps=4, sft_steps=2, dpo_steps=2, prompts=2,
                                                      candidates=2, max_frames=12, max_text_tokens=8))
    # the runbook's reflection command on the DPO-1 model, then again: the second run resumes, generating nothing
    from ualm_nemo.testing.examples import load_example

    argv = ["--checkpoint", f"{output_dir}/dpo1/checkpoints", "--codec", f"{output_dir}/pretrain/codec", "--prompts",
            f"{output_dir}/prompts.jsonl", "--output", f"{output_dir}/reflection_cli", "--max-frames", "12",
            "--min-frames", "5", "--max-text-tokens", "8", "--batch-size", "1", "--no-progress"]
    result["cli"] = [load_example("make_reflection_data").main(argv), load_example("make_reflection_data").main(argv)]
    return result


@pytest.mark.slow
def test_posttrain_demo_runs_the_two_rounds(tmp_path):
    from ualm_nemo.data.conversation import read_conversation_manifest

    out = run_distributed(1, _chain, str(tmp_path / "demo"), timeout=600)[0]
    cli = tmp_path / "demo" / "reflection_cli"
    records = [json.loads(line)["id"] for name in ("reflection.jsonl", "skipped.jsonl")
               for line in (cli / name).read_text().splitlines()]
    assert out["cli"] == [0, 0] and sorted(records) == ["p0", "p1"]  # each prompt once, written or skipped
    stages = ("pretrain", "sft1", "dpo1", "sft2", "dpo2")
    assert [out[s]["step"] for s in stages] == [4, 2, 2, 2, 2] and [out[s]["rejects"] for s in stages] == [0] * 5
    for stage in ("dpo1", "dpo2"):  # policy == reference (the SFT model it starts from) at step 1
        assert out[stage]["first_loss"] == pytest.approx(math.log(2), abs=1e-4) and 0 <= out[stage]["accuracy"] <= 1
    assert out["pairs1"]["pairs"] == out["pairs2"]["pairs"] == 2
    assert out["reflection"]["records"] == 2 and not out["reflection"]["skipped"]
    sft2 = read_conversation_manifest(tmp_path / "demo" / "reflection" / "sft2.jsonl")
    assert not sft2.rejects and sum(r.id.startswith("reflect-") for r in sft2.records) == 2
    for stage in ("sft1", "dpo1", "sft2", "dpo2"):  # every stage started from the one before
        assert (tmp_path / "demo" / stage / "checkpoints").is_dir()
