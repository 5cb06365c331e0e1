"""Talk to a UALM checkpoint: audio questions, text chat, and the UALM-Reason modes; saves a transcript.

  # audio understanding: audio file(s) + a question -> text
  python examples/chat.py understand --checkpoint ckpt/ --audio dog.wav --question "What animal is this?"
  # chat (the model answers in text or audio, as it chooses); interactive when no --say is given
  python examples/chat.py chat --checkpoint ckpt/ --codec xcodec/ --say "make me a rain sound" --say "louder"
  # reasoning modes over one or more prompts
  python examples/chat.py enrich  --checkpoint ckpt/ --codec xcodec/ --prompt "something spooky"
  python examples/chat.py reflect --checkpoint ckpt/ --codec xcodec/ --prompt "a busy street"
  # any mode scripted from json: {"mode": "chat", "turns": [{"text": "...", "audio": ["a.wav"]}]}
  #                           or {"mode": "reflect", "prompts": ["...", "..."]}
  python examples/chat.py script --checkpoint ckpt/ --codec xcodec/ --script session.json

Interactive chat: type a line to send it; ``/audio PATH`` attaches a file to your next turn; ``/quit`` ends.
Everything produced goes to ``--out-dir``: ``transcript*.json`` (every step, text and audio) and its wav files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ualm_nemo.data.formatting import AudioIn
from ualm_nemo.inference import reasoning
from ualm_nemo.inference.cli import add_generation_args, add_model_args, check_paths, generation_config, \
    load_inference
from ualm_nemo.inference.transcript import Step, Transcript

MODES = ("understand", "chat", "enrich", "reflect")


def read_audio(path: str, parser: argparse.ArgumentParser) -> tuple[str, AudioIn]:
    """A file -> (its name, 16 kHz mono clip); unreadable or empty audio ends with one line naming it."""
    from ualm_nemo.data.raw import load_audio

    try:
        wav = load_audio(path)
    except Exception as err:  # soundfile raises several types for unreadable files
        parser.error(f"cannot read audio {path}: {err}")
    if wav.numel() == 0:
        parser.error(f"audio {path} is empty")
    return path, AudioIn(wav)


def _script(path: str, parser: argparse.ArgumentParser) -> dict:
    try:
        script = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        parser.error(f"--script {path}: {err}")
    if not isinstance(script, dict) or script.get("mode") not in MODES:
        parser.error(f"--script {path}: needs a json object with \"mode\" in {MODES}")
    key = "prompts" if script["mode"] in ("enrich", "reflect") else "turns"
    if not isinstance(script.get(key), list) or not script[key]:
        parser.error(f"--script {path}: mode {script['mode']!r} needs a non-empty list {key!r}")
    return script


def _turns_from(args: argparse.Namespace) -> list[dict]:
    if args.mode == "understand":
        return [{"text": args.question or "", "audio": args.audio or []}]
    return [{"text": t, "audio": []} for t in args.say or []]


def run_chat(infer, turns: list[dict] | None, args, parser, cfg, understand: bool) -> Transcript:
    dialogue = reasoning.Dialogue(infer, seed=args.seed, cfg=cfg)
    if understand:  # one question, answered in text
        turn = turns[0]
        clips = [read_audio(p, parser) for p in turn.get("audio", [])]
        if not clips:
            parser.error("understand: give at least one --audio file")
        if not infer.listens:
            parser.error("understand: this checkpoint has no audio input (model.audio_in.enabled=false)")
        if not turn.get("text", "").strip():
            parser.error("understand: give a --question")
        reply = infer.reply([[("user", [c for _, c in clips] + ["\n" + turn["text"]])]], "text", [args.seed], cfg)[0]
        transcript = Transcript("understand")
        transcript.add(Step("user", "question", turn["text"], audio_paths=[n for n, _ in clips]))
        transcript.add(Step.from_reply("answer", reply))
        print(reply.text)
        return transcript
    for turn in turns if turns is not None else _interactive(parser):
        clips = [read_audio(p, parser) for p in turn.get("audio", [])]
        reply = dialogue.say(turn.get("text", ""), clips)
        _show(reply)
    return dialogue.transcript


def _interactive(parser):
    """Turns typed in the terminal."""
    pending: list[str] = []
    print("chat: type a message; /audio PATH attaches a file; /quit ends", file=sys.stderr)
    for line in sys.stdin:
        line = line.strip()
        if line in ("/quit", "/exit"):
            return
        if line.startswith("/audio "):
            pending.append(line.split(maxsplit=1)[1])
            continue
        if line:
            yield {"text": line, "audio": pending}
            pending = []


def _show(reply) -> None:
    for part in reply.parts:
        print(f"assistant: {part}" if isinstance(part, str) else
              f"assistant: [audio {part.seconds:.2f} s]")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=(*MODES, "script"))
    add_model_args(parser)
    add_generation_args(parser)
    parser.add_argument("--audio", action="append", help="understand: an audio file (repeatable)")
    parser.add_argument("--question", help="understand: the question about the audio")
    parser.add_argument("--say", action="append", help="chat: a user turn (repeatable); none = interactive")
    parser.add_argument("--prompt", action="append", help="enrich / reflect: a prompt (repeatable)")
    parser.add_argument("--script", help="script mode: a json file (see above)")
    parser.add_argument("--out-dir", default="chat_out")
    args = parser.parse_args(argv)
    cfg = generation_config(args, parser)
    check_paths(args, parser)
    script = _script(args.script, parser) if args.mode == "script" else None
    mode = script["mode"] if script else args.mode
    prompts = (script or {}).get("prompts") or args.prompt
    if mode in ("enrich", "reflect") and not prompts:
        parser.error(f"{mode}: give at least one --prompt")
    if mode in ("enrich", "reflect") and any(not isinstance(p, str) or not p.strip() for p in prompts):
        parser.error(f"{mode}: every prompt must be a non-empty string")
    if args.mode == "understand" and not (args.audio and (args.question or "").strip()):
        parser.error("understand: give --audio FILE (repeatable) and a --question")
    for path in (args.audio or []) if args.mode == "understand" else []:
        read_audio(path, parser)  # unreadable files end the command before the model loads
    if mode in ("enrich", "reflect") and args.codec is None:
        parser.error(f"{mode} writes audio: give --codec")
    infer = load_inference(args, parser)
    if mode == "reflect" and not infer.listens:
        parser.error("reflect listens to its own audio: this checkpoint has no audio input")
    if mode in ("enrich", "reflect"):
        run = reasoning.enrich if mode == "enrich" else reasoning.self_reflect
        seeds = [args.seed + k for k in range(len(prompts))]
        transcripts = run(infer, prompts, seeds, cfg)
    else:
        turns = script["turns"] if script else (_turns_from(args) or None)
        transcripts = [run_chat(infer, turns, args, parser, cfg, understand=mode == "understand")]
    for k, transcript in enumerate(transcripts):
        stem = "transcript" if len(transcripts) == 1 else f"transcript_{k:03d}"
        path = transcript.save(args.out_dir, stem)
        if mode in ("enrich", "reflect"):
            for step in transcript.steps:
                if step.role == "assistant":
                    print(f"[{k}] {step.name}: {step.text or ''}{' [audio]' if step.audio else ''}")
        print(f"transcript: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
