"""A small, real, on-disk dataset in the three raw formats of data/raw.py, for the demo and for tests.

Five sound classes whose waveforms differ by caption (so a tiny model has something learnable), each clip
1-3 s with random pitch / rate / level. Everything is a pure function of ``seed``.

Layout written under ``out_dir``::

    audio/tta_0000.wav ...      16 kHz mono PCM_16; some hold the sound between quiet margins (start/end used)
    audio/und_0000.wav ...
    tta.jsonl                   ETTA style: {"location","start_time","end_time","duration","caption","sample_rate"}
    understanding.json          Audio Flamingo 3 style list: {"id","sound","duration","conversations":[...]}
    text.jsonl                  {"input":[{"role","content"}],"output"}

Audio paths are relative to the manifest's folder so the demo folder can be copied elsewhere as a whole.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

import numpy as np
import soundfile as sf

SAMPLE_RATE = 16000

# class name (= TTA caption) -> answer to "What do you hear?"
SOUND_CLASSES: dict[str, str] = {
    "a low hum": "A low, steady hum.",
    "a high beep": "A high-pitched beep.",
    "white noise": "Broadband white noise.",
    "a rising chirp": "A tone that rises in pitch.",
    "clicks": "A series of short clicks.",
}
QUESTIONS = ("What do you hear?", "Describe the sound.", "What is this sound?")


def _hum(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    f0 = rng.uniform(70, 180)
    return np.sin(2 * np.pi * f0 * t) + 0.4 * np.sin(2 * np.pi * 2 * f0 * t) + 0.2 * np.sin(2 * np.pi * 3 * f0 * t)


def _beep(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.sin(2 * np.pi * rng.uniform(1500, 3000) * t)


def _noise(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal(t.shape[0]) * 0.5


def _chirp(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    f_start, f_end = rng.uniform(150, 400), rng.uniform(2500, 5000)
    rate = (f_end - f_start) / t[-1]
    return np.sin(2 * np.pi * (f_start * t + 0.5 * rate * t**2))  # phase = integral of the linear frequency sweep


def _clicks(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = np.zeros_like(t)
    period = int(SAMPLE_RATE / rng.uniform(3, 10))
    click = np.exp(-np.arange(80) / 12.0) * rng.choice([-1.0, 1.0], 80)  # 5 ms decaying burst
    for start in range(int(rng.integers(0, period)), t.shape[0] - click.shape[0], period):
        out[start:start + click.shape[0]] += click
    return out


_GENERATORS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "a low hum": _hum, "a high beep": _beep, "white noise": _noise, "a rising chirp": _chirp, "clicks": _clicks,
}


def synthesize_sound(caption: str, duration: float, rng: np.random.Generator) -> np.ndarray:
    """float32 [round(duration * 16000)] in [-1, 1] for one of SOUND_CLASSES, with 10 ms fades."""
    t = np.arange(round(duration * SAMPLE_RATE)) / SAMPLE_RATE
    x = _GENERATORS[caption](t, rng)
    x = x / max(np.abs(x).max(), 1e-8) * rng.uniform(0.2, 0.6)
    fade = min(160, x.shape[0] // 2)
    ramp = np.linspace(0.0, 1.0, fade)
    x[:fade] *= ramp
    x[x.shape[0] - fade:] *= ramp[::-1]
    return x.astype(np.float32)


def _write_wav(path: Path, wav: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), wav, SAMPLE_RATE, subtype="PCM_16")


def _balanced_classes(n: int, pyrng: random.Random) -> list[str]:
    """n class names, each class n // 5 or n // 5 + 1 times, in a seeded random order."""
    classes = [list(SOUND_CLASSES)[i % len(SOUND_CLASSES)] for i in range(n)]
    pyrng.shuffle(classes)
    return classes


def _tta_entries(out_dir: Path, n: int, rng: np.random.Generator, pyrng: random.Random) -> list[dict]:
    entries = []
    for i, caption in enumerate(_balanced_classes(n, pyrng)):
        duration = round(pyrng.uniform(1.0, 3.0), 2)
        sound = synthesize_sound(caption, duration, rng)
        margin = 0.5 if i % 3 == 2 else 0.0  # every third file: the captioned sound sits between quiet margins
        pad = (rng.standard_normal(round(margin * SAMPLE_RATE)) * 1e-3).astype(np.float32)
        rel = f"audio/tta_{i:04d}.wav"
        _write_wav(out_dir / rel, np.concatenate([pad, sound, pad]))
        entries.append({"location": rel, "start_time": margin, "end_time": round(margin + duration, 4),
                        "duration": duration, "caption": caption, "sample_rate": SAMPLE_RATE})
    return entries


def _understanding_entries(out_dir: Path, n: int, rng: np.random.Generator, pyrng: random.Random) -> list[dict]:
    entries = []
    for i, label in enumerate(_balanced_classes(n, pyrng)):
        duration = round(pyrng.uniform(1.0, 3.0), 2)
        rel = f"audio/und_{i:04d}.wav"
        _write_wav(out_dir / rel, synthesize_sound(label, duration, rng))
        conversations = [{"from": "human", "value": f"<sound>\n{pyrng.choice(QUESTIONS)}"},
                         {"from": "gpt", "value": SOUND_CLASSES[label]}]
        if i % 4 == 3:  # some multi-turn dialogues: the follow-up is answerable from the clip too
            conversations += [{"from": "human", "value": "About how long is it, in seconds?"},
                              {"from": "gpt", "value": f"About {round(duration)} seconds."}]
        entries.append({"id": f"und_{i:04d}", "sound": rel, "duration": duration, "conversations": conversations})
    return entries


def _text_entries(n: int, pyrng: random.Random) -> list[dict]:
    words = ("apple", "river", "stone", "cloud", "ember", "violet", "signal", "harbor")
    entries = []
    for i in range(n):
        a, b = pyrng.randint(0, 20), pyrng.randint(0, 20)
        kind = i % 3
        if kind == 0:
            turns, out = [{"role": "user", "content": f"What is {a} + {b}?"}], str(a + b)
        elif kind == 1:
            w = " ".join(pyrng.choice(words) for _ in range(pyrng.randint(1, 3)))
            turns, out = [{"role": "user", "content": f"Repeat exactly: {w}"}], w
        else:  # two-turn: the history's assistant answer is part of the input
            turns = [{"role": "user", "content": f"What is {a} + {b}?"},
                     {"role": "assistant", "content": str(a + b)},
                     {"role": "user", "content": f"And {a} - {b}?"}]
            out = str(a - b)
        entries.append({"input": turns, "output": out})
    return entries


def _write_jsonl(path: Path, entries: list[dict]) -> None:
    path.write_text("".join(json.dumps(e) + "\n" for e in entries), encoding="utf-8")


def synthesize_demo_data(out_dir: str | Path, num_tta: int = 40, num_understanding: int = 40, num_text: int = 40,
                         seed: int = 0) -> dict[str, Path]:
    """Write the demo dataset under ``out_dir``; returns {"tta", "understanding", "text"} -> manifest path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # one stream per task, so changing one count does not change the other tasks' data
    tta = _tta_entries(out_dir, num_tta, np.random.default_rng([seed, 0]), random.Random(f"{seed}:tta"))
    und = _understanding_entries(out_dir, num_understanding, np.random.default_rng([seed, 1]),
                                 random.Random(f"{seed}:understanding"))
    text = _text_entries(num_text, random.Random(f"{seed}:text"))
    paths = {"tta": out_dir / "tta.jsonl", "understanding": out_dir / "understanding.json",
             "text": out_dir / "text.jsonl"}
    _write_jsonl(paths["tta"], tta)
    paths["understanding"].write_text(json.dumps(und, indent=1), encoding="utf-8")
    _write_jsonl(paths["text"], text)
    return paths
