"""`make demo` end to end, shortened: synthesise, train, checkpoint, generate a wav, answer a question."""

from __future__ import annotations

import pytest
import soundfile

from ualm_nemo.testing.dist import run_distributed

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]


def _demo(output_dir: str) -> dict:
    from ualm_nemo.demo import run_demo

    result = run_demo(output_dir, max_steps=4)
    return {k: str(v) if not isinstance(v, (int, float, dict)) else v for k, v in result.items()}


def test_demo_writes_audio_and_checkpoints(tmp_path):
    out = run_distributed(1, _demo, str(tmp_path))[0]
    wav, rate = soundfile.read(out["wav"])
    assert rate == 16000 and wav.ndim == 1 and len(wav) == out["frames"] * 320 > 0
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "iter_0000004"
    assert any((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    assert out["answer"] is not None and out["answer"]["question"]
