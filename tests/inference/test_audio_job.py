"""The shared text-to-audio loop (inference/audio_job.py) behind generate.py and evaluate.py tta.

The real engine always ends a forced audio turn with audio (max_frames forces the end of the grid), so a reply
without audio cannot be produced by a model here; the scripted replier below stands in for one to prove the
loop records it as a skip (and keeps going) instead of crashing mid-run. The real-model paths are covered by
tests/inference/test_generate_cli.py and tests/eval/test_evaluate_tta.py."""

from __future__ import annotations

import json

import torch

from ualm_nemo.inference.audio_job import TTA_SETTINGS, generate_clips, tta_settings
from ualm_nemo.inference.engine import GenerationConfig
from ualm_nemo.inference.jobs import MANIFEST, Item, OutputFolder
from ualm_nemo.inference.pipeline import Reply, ReplyAudio


class ScriptedReplier:
    """UALMInference's prepare / decode for captions: 'silent' -> a reply without audio, anything else -> a 0.1 s
    clip (the request stands for its caption)."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def prepare(self, conversation, mode, seed, cfg):
        ((role, (caption,)),) = conversation
        assert role == "user" and mode == "audio"
        return caption

    def decode(self, captions, cfg):
        self.batches.append(list(captions))
        return [Reply([], "length") if c == "silent" else
                Reply([ReplyAudio(torch.zeros(5, 8, dtype=torch.long), torch.zeros(1, 1600), 16000)])
                for c in captions]


def test_reply_without_audio_is_a_recorded_skip(tmp_path):
    cfg = GenerationConfig()
    items = [Item("a", "beep", 1), Item("b", "silent", 2), Item("c", "noise", 3)]
    with OutputFolder(tmp_path / "out", tta_settings(cfg)) as folder:
        plan = folder.plan(items)
        folder.prepare(plan)
        replier = ScriptedReplier()
        counts = generate_clips(replier, cfg, folder, plan.todo, batch_size=2, progress=False)
    assert (counts.written, counts.no_audio) == (2, 1)
    assert replier.batches == [["beep", "silent"], ["noise"]]
    lines = {e["id"]: e for e in map(json.loads, (tmp_path / "out" / MANIFEST).read_text().splitlines())}
    assert lines["b"]["skipped"] == "no audio (stop='length')" and "audio" not in lines["b"]
    assert all(lines[i]["frames"] == 5 and (tmp_path / "out" / lines[i]["audio"]).is_file() for i in "ac")
    assert all(lines["a"][k] == getattr(cfg, k) for k in TTA_SETTINGS)
    with OutputFolder(tmp_path / "out", tta_settings(cfg)) as folder:  # a rerun does not retry the skip
        assert folder.plan(items).todo == []
