"""Evaluation during training (train.eval_every_n_steps): the training model generates for a fixed eval set and
its CLAP / FD / QA figures go to evaluation.jsonl and TensorBoard. The reference is the offline path: the
checkpoint saved at the same step, loaded by inference.load, decoded by UALMInference with the run's codec,
scored by the eval modules."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile

from ualm_nemo.model.config import ConfigError
from ualm_nemo.testing.dist import run_distributed
from ualm_nemo.testing.runs import tiny_run
from ualm_nemo.training.run_config import check_data_paths, run_config_from_dict

CAPTIONS = ("a dog barks twice", "rain on a tin roof", "a bell rings")


def _clip(path: Path, seconds: float, freq: float, seed: int) -> str:
    t = np.arange(int(seconds * 16000)) / 16000
    wav = 0.3 * np.sin(2 * np.pi * freq * t) + 0.05 * np.random.default_rng(seed).standard_normal(t.shape)
    soundfile.write(path, wav.astype(np.float32), 16000)
    return path.name


def write_eval_set(root: Path) -> dict[str, str]:
    """A 3-caption TTA set with reference clips, a 2-question MMAU-style set, random CLAP and OpenL3 files."""
    import torch

    from ualm_nemo.eval import openl3_fd
    from ualm_nemo.testing.metric_models import write_random_clap

    root.mkdir(parents=True, exist_ok=True)
    lines = [{"id": f"cap{k}", "caption": c, "audio": _clip(root / f"ref{k}.wav", 1.0 + 0.5 * k, 300 + 200 * k, k)}
             for k, c in enumerate(CAPTIONS)]
    (root / "tta.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    qa = [{"id": f"q{k}", "audio_id": _clip(root / f"q{k}.wav", 1.0, 440 * (k + 1), 10 + k), "question": q,
           "choices": choices, "answer": choices[k], "task": task}
          for k, (q, choices, task) in enumerate((("What is heard?", ["a dog", "a bell"], "sound"),
                                                  ("Which instrument?", ["piano", "violin", "drums"], "music")))]
    (root / "qa.json").write_text(json.dumps(qa))
    torch.manual_seed(0)
    torch.save(openl3_fd.build_model("env").state_dict(), root / "openl3.pth.tar")
    clap = write_random_clap(root / "clap")
    return {"tta_set": str(root / "tta.jsonl"), "qa_set": str(root / "qa.json"), "openl3": str(root / "openl3.pth.tar"),
            "clap": str(clap["clap"]), "clap_tokenizer": str(clap["clap_tokenizer"])}


@pytest.fixture(scope="module")
def eval_set(tmp_path_factory) -> dict[str, str]:
    return write_eval_set(tmp_path_factory.mktemp("eval_set"))


EVAL = {"cfg_scale": 2.0, "max_frames": 6, "max_answer_tokens": 6, "batch_size": 2}


def _config(output_dir: str, eval_set: dict, every: int = 2, steps: int = 4, stop_at: int | None = None,
            tp: int = 2) -> dict:
    cfg = tiny_run(output_dir, "pretrain", steps, None, {"synthesize": True, "synthetic_samples_per_task": 4},
                   stop_at=stop_at)
    cfg["train"].update(eval_every_n_steps=every, checkpoint_every_n_steps=2, keep_last_checkpoints=5)
    cfg["model"]["parallel"] = {"tensor_model_parallel_size": tp}
    cfg["eval"] = {**eval_set, **EVAL}
    return cfg


def offline_figures(run_dir: str, step: int, eval_set: dict, out: str, tensor_parallel: int) -> dict | None:
    """The reference: the checkpoint of ``step`` decoded by the inference pipeline, scored by the eval modules
    (every rank loads and, at TP > 1, decodes in step; rank 0 scores; at TP1 rank 0 alone decodes)."""
    import torch

    from ualm_nemo.codec.xcodec import CodecTokenizer
    from ualm_nemo.data.tokenizer import build_tokenizer
    from ualm_nemo.eval import tta, understanding
    from ualm_nemo.eval.audio_qa import read_benchmark
    from ualm_nemo.inference.jobs import OutputFolder, read_items
    from ualm_nemo.inference.load import load_for_inference
    from ualm_nemo.inference.pipeline import UALMInference
    from ualm_nemo.training.eval_config import EvalConfig
    from ualm_nemo.training.evaluation import qa_generation, tta_generation

    cfg = EvalConfig(**{**eval_set, **EVAL})
    model, _, loaded = load_for_inference(f"{run_dir}/checkpoints/iter_{step:07d}", tensor_parallel=tensor_parallel)
    assert loaded == step
    rank = torch.distributed.get_rank()
    if tensor_parallel == 1 and rank:
        return None
    out = f"{out}/rank{rank}"
    infer = UALMInference(model, build_tokenizer("byte"), CodecTokenizer.from_pretrained(f"{run_dir}/codec"),
                          batch_size=cfg.batch_size)  # the same batches as the evaluator's (DP1)
    items = read_items(cfg.tta_set)
    clips, root = [], Path(cfg.tta_set).parent
    with OutputFolder(f"{out}/tta", {}) as folder:
        folder.prepare(folder.plan(items))
        for item, reply in zip(items, infer.text_to_audio([i.caption for i in items], [i.seed for i in items],
                                                          tta_generation(cfg))):
            entry = folder.add(item, reply.audio[0].wav, reply.audio[0].sample_rate)
            clips.append(tta.Clip(item.id, item.caption, Path(out) / "tta" / entry["audio"]))
    questions, _ = read_benchmark(cfg.qa_set, "mmau")
    with OutputFolder(f"{out}/qa", {}) as folder:
        plan = folder.plan(understanding.job_items(questions))
        folder.prepare(plan)
        understanding.answer(infer, questions, folder, plan.todo, 8, qa_generation(cfg), progress=False)
        answers, _ = understanding.predictions(folder)
    if rank:
        return None
    models = tta.load_models(["clap", "fd_openl3"], {"clap": cfg.clap, "openl3": cfg.openl3},
                             clap_tokenizer=cfg.clap_tokenizer)
    reference = tta.extract(models, [tta.Clip(i.id, i.caption, root / i.extra["audio"]) for i in items], ["openl3"])
    row = tta.score_row(["clap", "fd_openl3"], tta.extract(models, clips, ["openl3", "clap"]),
                        {i.id: i.caption for i in items}, reference, models)
    result = understanding.score(questions, answers)
    return {"clap": row["metrics"]["clap"], "fd_openl3": row["metrics"]["fd_openl3"], "qa_accuracy": result.accuracy,
            "answers": answers, "wavs": {c.id: soundfile.read(c.audio)[0].tolist() for c in clips}}


def _runs(root: str, eval_set: dict) -> dict:
    """In one launch at TP2: 4 steps evaluated at 2 and 4; the same without evaluation; a job ended at step 3
    and its resumption; the offline figures of the first run's checkpoints (steps 2 and 4 at TP2, 4 at TP1)."""
    from ualm_nemo.training.train import train

    out = {"with": train(_config(f"{root}/with", eval_set)).loss_history,
           "without": train(_config(f"{root}/without", eval_set, every=0)).loss_history}
    first = train(_config(f"{root}/resumed", eval_set, stop_at=3))
    out["first_last"] = first.last_evaluation
    out["resumed"] = first.loss_history + train(_config(f"{root}/resumed", eval_set)).loss_history
    out["offline"] = {step: offline_figures(f"{root}/with", step, eval_set, f"{root}/offline{step}", 2)
                      for step in (2, 4)}
    out["tp1"] = offline_figures(f"{root}/with", 4, eval_set, f"{root}/tp1", 1)
    out["dp2"] = _data_parallel_figures(root, eval_set)
    return out


def _data_parallel_figures(root: str, eval_set: dict) -> dict:
    """The evaluator itself at TP1 x DP2 on the step-4 checkpoint: each DP rank decodes half the items, rank 0
    gathers, scores and shares the figures (and a scoring failure on rank 0 reaches every rank)."""
    from ualm_nemo.inference.load import load_for_inference
    from ualm_nemo.training.evaluation import TrainingEvaluator

    model, _, _ = load_for_inference(f"{root}/with/checkpoints/iter_0000004", tensor_parallel=1)
    run = run_config_from_dict(_config(f"{root}/dp2", eval_set, tp=1))  # the run's codec: the same tiny one
    figures = TrainingEvaluator(run)(model, 4)
    # the CLAP file gone after the launch check: rank 0 fails while scoring, and every rank must raise instead
    # of waiting for rank 0's figures
    broken = run_config_from_dict(_config(f"{root}/broken", {**eval_set, "clap": f"{root}/gone.pt"}, tp=1))
    try:
        TrainingEvaluator(broken)(model, 4)
        failure = "no error"
    except RuntimeError as err:
        failure = str(err)
    return {**figures, "failure": failure}


def _step_wavs(run_dir: Path, step: int) -> dict:
    folder = run_dir / "evaluation" / f"step_{step:07d}"
    lines = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
    return {e["id"]: soundfile.read(folder / e["audio"])[0].tolist() for e in lines}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_evaluation_during_training(tmp_path, eval_set):
    """TP2 (2 processes): figures == the offline pipeline on the checkpoint of the same step (at TP2 exactly, at
    TP1 and TP1 x DP2 within round-off); training bit-identical with and without evaluation; a resumed job
    continues evaluation.jsonl (no duplicate, no gap) and the checkpoint carries the newest figures; TensorBoard
    eval/*; a failure on rank 0 raises on every rank (no hang)."""
    from ualm_nemo.training.evaluation import EvaluationLog

    runs = run_distributed(2, _runs, str(tmp_path), eval_set, timeout=600)
    out = runs[0]
    assert out["with"] == out["without"] == out["resumed"]  # evaluating changes nothing in training, bit for bit
    assert runs[1]["with"] == runs[1]["without"]
    log = EvaluationLog(tmp_path / "with").read()
    assert [r["step"] for r in log] == [2, 4]
    for line in log:
        ref = out["offline"][line["step"]]
        assert _step_wavs(tmp_path / "with", line["step"]) == ref["wavs"]  # the same clips, sample for sample
        for key in ("clap", "fd_openl3", "qa_accuracy"):
            assert line[key] == ref[key], key
        qa = json.loads((tmp_path / "with" / "evaluation" / f"step_{line['step']:07d}" / "qa.json").read_text())
        assert {i["id"]: i["prediction"] for i in qa["items"]} == ref["answers"]
        assert line["tta_clips"] == line["tta_scored"] == 3 and line["qa_total"] == 2
        assert set(line) >= {"qa_accuracy_sound", "qa_accuracy_music"}
    assert log[0]["clap"] != log[1]["clap"]  # the weights moved: each step's figures are its own
    for key in ("clap", "fd_openl3", "qa_accuracy"):  # the same checkpoint decoded at TP1, and split over DP2
        assert out["tp1"][key] == pytest.approx(log[1][key], rel=1e-4, abs=1e-6), key
        assert out["dp2"][key] == pytest.approx(log[1][key], rel=1e-4, abs=1e-6), key
    assert runs[1]["dp2"] == out["dp2"]  # every rank gets rank 0's figures
    for rank in (0, 1):
        failure = runs[rank]["dp2"]["failure"]
        assert "evaluation at step 4 failed on rank 0" in failure and "gone.pt" in failure
    assert out["dp2"]["tta_clips"] == out["dp2"]["tta_scored"] == 3 and out["dp2"]["qa_total"] == 2
    assert _step_wavs(tmp_path / "dp2", 4).keys() == {"cap0", "cap1", "cap2"}
    resumed = EvaluationLog(tmp_path / "resumed").read()
    assert resumed == log  # the job ended at step 3 handed on; the resumed job did step 4 once
    assert out["first_last"] == log[0]
    import torch  # the checkpoint of step 3 keeps the figures of step 2 (what the first job handed on)

    common = torch.load(tmp_path / "resumed" / "checkpoints" / "iter_0000003" / "ualm_common.pt", weights_only=False)
    assert common["evaluation"] == log[0]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "resumed" / "tensorboard")).Reload()
    for key in ("clap", "fd_openl3", "qa_accuracy"):
        scalars = events.Scalars(f"eval/{key}")
        assert [e.step for e in scalars] == [2, 4]
        assert [e.value for e in scalars] == pytest.approx([r[key] for r in log], rel=1e-6)


def _bad(tmp_path, eval_set, train=None, evaluation=None, parallel=None) -> str:
    cfg = _config(str(tmp_path), eval_set)
    cfg["train"].update(train or {})
    cfg["eval"].update(evaluation or {})
    cfg["model"]["parallel"].update(parallel or {})
    with pytest.raises(ConfigError) as err:
        check_data_paths(run_config_from_dict(cfg).validate())
    return str(err.value)


def test_bad_evaluation_keys_are_named(tmp_path, eval_set):
    assert "train.eval_every_n_steps=-1" in _bad(tmp_path, eval_set, {"eval_every_n_steps": -1})
    assert "needs an eval set" in _bad(tmp_path, eval_set, evaluation={"tta_set": None, "qa_set": None})
    assert "eval.tta_set is scored by CLAP" in _bad(tmp_path, eval_set, evaluation={"clap": None, "openl3": None})
    assert "eval.clap_tokenizer" in _bad(tmp_path, eval_set, evaluation={"clap_tokenizer": None})
    assert "eval.qa_kind='mmlu'" in _bad(tmp_path, eval_set, evaluation={"qa_kind": "mmlu"})
    assert "eval.max_frames=0" in _bad(tmp_path, eval_set, evaluation={"max_frames": 0})
    assert "eval.cfg_scale=0.0" in _bad(tmp_path, eval_set, evaluation={"cfg_scale": 0})
    assert "unknown key(s) eval.cfg" in _bad(tmp_path, eval_set, evaluation={"cfg": 3})
    gone = _bad(tmp_path, eval_set, evaluation={"clap": str(tmp_path / "no.pt")})
    assert "eval.clap=" in gone and "no such checkpoint file" in gone
    assert "eval.tta_set=" in _bad(tmp_path, eval_set, evaluation={"tta_set": str(tmp_path / "no.jsonl")})
    assert "eval.qa_set=" in _bad(tmp_path, eval_set, evaluation={"qa_set": str(tmp_path / "no.json")})
    assert "model.parallel.pipeline_model_parallel_size=2" in _bad(tmp_path, eval_set,
                                                                    parallel={"pipeline_model_parallel_size": 2})
    assert "sequence_parallel=true" in _bad(tmp_path, eval_set, parallel={"sequence_parallel": True,
                                                                          "tensor_model_parallel_size": 2})
    root = Path(eval_set["tta_set"]).parent
    lines = (root / "tta.jsonl").read_text().splitlines()
    no_ref = tmp_path / "no_ref.jsonl"
    no_ref.write_text("\n".join(lines[:2] + [json.dumps({"id": "x", "caption": "wind"})]) + "\n")
    assert "eval.openl3 (FD)" in _bad(tmp_path, eval_set, evaluation={"tta_set": str(no_ref),
                                                                      "tta_audio_root": str(root)})
    bad_qa = tmp_path / "qa.json"
    bad_qa.write_text(json.dumps([{"id": "q", "audio_id": "q0.wav", "question": "?", "choices": ["a", "b"],
                                   "answer": "c"}]))
    bad = _bad(tmp_path, eval_set, evaluation={"qa_set": str(bad_qa), "qa_audio_root": str(root)})
    assert "eval.qa_set=" in bad and "not one of the choices" in bad
    no_audio = tmp_path / "qa_gone.json"
    no_audio.write_text(json.dumps([{"id": "q", "audio_id": "gone.wav", "question": "?", "choices": ["a", "b"],
                                     "answer": "a"}]))
    assert "audio files do not exist" in _bad(tmp_path, eval_set, evaluation={"qa_set": str(no_audio)})
    # off: the eval section is not read at all
    cfg = _config(str(tmp_path), eval_set, every=0)
    cfg["eval"]["clap"] = str(tmp_path / "no.pt")
    check_data_paths(run_config_from_dict(cfg).validate())


def test_eval_enhancer_is_checked_at_launch_and_writes_the_step_clips_at_48k(tmp_path, eval_set, tiny_enhancer):
    """eval.enhancer: a path that is not an enhancer stops the launch with one line naming the key; a good one is
    what the step's clips go through (48 kHz stereo in the step folder, its manifest and scores' format)."""
    import torch

    from ualm_nemo.training.evaluation import TrainingEvaluator, step_folder

    for bad, words in ((tmp_path / "nope", "no such file or folder"), (Path(eval_set["tta_set"]).parent,
                                                                       "neither an exported enhancer")):
        message = _bad(tmp_path, eval_set, evaluation={"enhancer": str(bad)})
        assert message.startswith(f"eval.enhancer={str(bad)!r}: ") and words in message and "\n" not in message
    assert "set eval.tta_set too" in _bad(tmp_path, eval_set, evaluation={"enhancer": str(tiny_enhancer),
                                                                          "tta_set": None})
    cfg = _config(str(tmp_path / "run"), eval_set)
    cfg["eval"]["enhancer"] = str(tiny_enhancer)
    run = run_config_from_dict(cfg).validate()
    check_data_paths(run)
    evaluator = TrainingEvaluator(run)
    evaluator._load_audio("cpu")  # what the first evaluation loads on rank 0 (with the metric models)
    torch.manual_seed(0)
    codec = evaluator.codec
    codes = {i.id: torch.randint(0, codec.codebook_size, (5, codec.num_codebooks)) for i in evaluator.tta_items}
    codes["cap1"] = None  # a reply without audio stays a counted skip
    clips = evaluator._write_clips(2, step_folder(run.output_dir, 2), codes)
    assert [c.audio is None for c in clips] == [False, True, False]
    for clip in (clips[0], clips[2]):
        info = soundfile.info(str(clip.audio))
        assert (info.samplerate, info.channels, info.frames) == (48000, 2, 3 * 320 * 5)
    entry = json.loads((step_folder(run.output_dir, 2) / "manifest.jsonl").read_text().splitlines()[0])
    assert entry["sample_rate"] == 48000 and entry["enhancer"] == str(tiny_enhancer)


def test_training_state_kept_restores_flags_and_generators():
    """What the evaluation draws or switches inside is undone: train/eval flags, torch, numpy and random."""
    import random

    import torch

    from ualm_nemo.training.evaluation import training_state_kept

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1))
    model[1].eval()  # a mixed state comes back as it was, not as model.train()
    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    expected = torch.rand(3), np.random.rand(3), random.random()
    torch.set_rng_state(states[0]), np.random.set_state(states[1]), random.setstate(states[2])
    with training_state_kept(model):
        model.eval()
        torch.rand(7), np.random.rand(7), random.random()
    after = torch.rand(3), np.random.rand(3), random.random()
    assert torch.equal(after[0], expected[0]) and np.array_equal(after[1], expected[1]) and after[2] == expected[2]
    assert [m.training for m in model.modules()] == [True, True, False]
