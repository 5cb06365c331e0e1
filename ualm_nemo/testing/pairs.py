"""Tiny post-training data on disk: SFT conversations and DPO preference pairs (formats: data/conversation.py).

``write_pair_manifest``: what examples/make_preference_pairs.py writes, without a model: each pair's prompt is one
user caption (the odd pairs also hear a short clip), its chosen and rejected turns are random codes of different
lengths (the even pairs' rejected turn is text), so every scoring path — text, grid, heard audio — is exercised.

``write_conversation_manifest``: self-reflection-shaped conversations: a caption, a rich caption and a written
clip, the same clip heard again in the next user turn, a text critique.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf

CAPTIONS = ("a dog barks twice", "rain on a tin roof", "a bell rings in a hall", "birds at dawn", "a car passes",
            "waves on a beach", "a door creaks open", "applause in a room")


def write_pair_manifest(root: str | Path, num_pairs: int, seed: int = 0, heard_audio: bool = True,
                        frames: tuple[int, int] = (3, 9)) -> Path:
    """root/pairs.jsonl (+ codes/*.npy, clip.wav) with ``num_pairs`` valid pairs -> the manifest path."""
    root = Path(root)
    (root / "codes").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if heard_audio:
        sf.write(root / "clip.wav", (0.1 * rng.standard_normal(16000)).astype(np.float32), 16000)
    lines = []
    for k in range(num_pairs):
        sides = {}
        for side in ("chosen", "rejected"):
            if side == "rejected" and k % 2 == 0:
                sides[side] = [{"text": f"I cannot make {CAPTIONS[k % len(CAPTIONS)]}."}]
                continue
            codes = rng.integers(0, 1024, size=(int(rng.integers(*frames)), 8)).astype(np.int16)
            np.save(root / "codes" / f"{k}_{side}.npy", codes)
            sides[side] = [{"codes": f"codes/{k}_{side}.npy"}]
        user = [{"text": CAPTIONS[k % len(CAPTIONS)]}]
        if heard_audio and k % 2 == 1:
            user = [{"audio": "clip.wav", "start": 0.0, "end": 0.5}, {"text": "make it like this: " + user[0]["text"]}]
        lines.append({"id": f"pair-{k}", "prompt": [{"role": "user", "content": user}], **sides})
    path = root / "pairs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def write_conversation_manifest(root: str | Path, num_conversations: int, seed: int = 0, seconds: float = 0.6
                                ) -> Path:
    """root/sft.jsonl (+ clips/*.wav) with ``num_conversations`` valid conversations -> the manifest path."""
    root = Path(root)
    (root / "clips").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    lines = []
    for k in range(num_conversations):
        caption = CAPTIONS[k % len(CAPTIONS)]
        wave = 0.3 * np.sin(2 * np.pi * (200 + 100 * k) * t) + 0.02 * rng.standard_normal(t.size)
        sf.write(root / "clips" / f"{k}.wav", wave.astype(np.float32), 16000)
        clip = f"clips/{k}.wav"
        rich = {"keywords": caption.split()[:2], "layout": f"0-{seconds:g} s one event", "description": caption}
        lines.append({"id": f"conv-{k}", "turns": [
            {"role": "user", "content": caption},
            {"role": "assistant", "content": [{"rich_caption": rich}, {"audio": clip}]},
            {"role": "user", "content": [{"audio": clip}, {"text": "Listen to it: does it match?"}]},
            {"role": "assistant", "content": f"It matches: {caption}."}]})
    path = root / "sft.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path
