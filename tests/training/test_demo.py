"""`make demo` end to end, shortened: synthesise, train, checkpoint, generate a wav, answer a question."""

from __future__ import annotations

from pathlib import Path

import pytest
import soundfile

from ualm_nemo.testing.dist import run_distributed

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]


def _demo(output_dir: str) -> dict:
    import contextlib
    import io
    from pathlib import Path

    import torch

    from ualm_nemo.demo import run_demo
    from ualm_nemo.inference.load import load_for_inference
    from ualm_nemo.testing.examples import load_example

    result = run_demo(output_dir, max_steps=4)
    trained = result.pop("model").engine.chunks[0].eval()
    # `make demo` again, through its entry point: the finished run is loaded (not retrained), reported, and
    # generates again
    Path(result["wav"]).unlink()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        load_example("demo").main(["--output-dir", output_dir, "--max-steps", "4"])
    result["rerun"] = {"printed": printed.getvalue(), "wav": Path(result["wav"]).is_file()}
    with contextlib.redirect_stdout(io.StringIO()):  # the README's `examples/plot_steps.py demo_out`
        assert load_example("plot_steps").main([output_dir]) == 0
    result["plots"] = {"names": sorted(p.name for p in (Path(output_dir) / "plots").iterdir())}
    tokens = torch.tensor([trained.ualm.vocab.text_position_streams(i) for i in (257, 65, 66, 67)])[None]
    with torch.no_grad():
        expected = trained(tokens)
        loaded, cfg, step = load_for_inference(f"{output_dir}/checkpoints")
        got = loaded(tokens)
    result["reload"] = {"step": step, "same_config": cfg.backbone == trained.ualm.backbone,
                        "max_diff": max(float((a - b).abs().max()) for a, b in zip(expected, got))}
    # one decoding loop over three model paths on the same trained checkpoint: Megatron with its static KV cache,
    # Megatron recomputing the sequence, and the transformers-side class (read from the checkpoint) with its cache
    from ualm_nemo.data.formatting import SampleFormatter
    from ualm_nemo.data.tokenizer import build_tokenizer
    from ualm_nemo.inference.engine import GenerationConfig, Request
    from ualm_nemo.inference.generate import decode
    from ualm_nemo.inference.hf_model import UALMForConditionalGeneration

    hf = UALMForConditionalGeneration.from_checkpoint(f"{output_dir}/checkpoints")
    tokenizer = build_tokenizer("byte")
    fmt = SampleFormatter(tokenizer, cfg.vocab, cfg_dropout=0.0)
    requests = [Request(prompt=fmt.conversation_prompt([("user", [c])])[0], mode=m, seed=5)
                for c, m in (("a high beep", "audio"), ("a low hum", "audio"), ("a high beep", "auto"))]
    gen = GenerationConfig(max_frames=30, min_frames=10, max_text_tokens=8)
    runs = [decode(loaded, tokenizer, requests, gen), decode(loaded, tokenizer, requests, gen, use_cache=False),
            decode(hf, tokenizer, requests, gen)]
    same = all(len(a.audio) == len(b.audio) and a.text_ids == b.text_ids
               and all(torch.equal(x, y) for x, y in zip(a.audio, b.audio))
               for run in runs[1:] for a, b in zip(runs[0], run))
    result["kv_cache"] = {"frames": int(runs[0][0].audio[0].shape[0]), "same_codes": same,
                          "auto_picks": [s.kind for s in runs[0][2].segments]}
    return {k: str(v) if not isinstance(v, (int, float, dict)) else v for k, v in result.items()}


def test_demo_writes_audio_and_checkpoints(tmp_path):
    out = run_distributed(1, _demo, str(tmp_path))[0]
    wav, rate = soundfile.read(out["wav"])
    assert rate == 16000 and wav.ndim == 1 and len(wav) == out["frames"] * 320 > 0
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "iter_0000004"
    assert any((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    # the demo validates (every 2 steps of 4 here, every 50 of 300 in `make demo`): plot_steps has its series
    from ualm_nemo.training.validation import ValidationLog

    lines = ValidationLog(tmp_path).read()
    assert [line["step"] for line in lines] == [2, 4]
    assert all(line["tokens_tta"] and line["tokens_understanding"] and line["tokens_text"] for line in lines)
    assert {"val_loss.png", "val_loss_text.png"} <= set(out["plots"]["names"])
    assert out["answer"] is not None and out["answer"]["question"]
    # the checkpoint alone (config included) rebuilds the trained model for generation
    assert out["reload"] == {"step": 4, "same_config": True, "max_diff": 0.0}
    printed = out["rerun"]["printed"]
    assert "already trained to step 4: nothing trained this time" in printed and out["rerun"]["wav"], printed
    assert f"generated audio    {out['wav']}  (" in printed and " codec frames" in printed
    assert out["kv_cache"]["same_codes"] and out["kv_cache"]["frames"] >= 10


def test_demo_flags_are_checked_before_work(tmp_path, capsys):
    from ualm_nemo.testing.examples import load_example

    (tmp_path / "a_file").write_text("x")
    for argv, message in ((["--max-steps", "0"], "argument --max-steps: 0 must be at least 1"),
                          (["--max-steps", "abc"], "argument --max-steps: 'abc' is not a whole number"),
                          (["--output-dir", str(tmp_path / "a_file" / "out")], "is a file, not a folder")):
        with pytest.raises(SystemExit) as done:
            load_example("demo").main(["--output-dir", str(tmp_path / "out"), *argv])
        assert done.value.code == 2 and message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
