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
Each run writes into a folder of its own, ``--out-dir/<UTC start time>/`` (``-2``, ``-3``, ... when two runs
start in the same second): ``transcript*.json`` (every step, text and audio) and its wav files: 16 kHz mono as
the codec decodes them, or 48 kHz stereo through --enhancer (the transcript's "audio_format" says which, and each
clip its sample_rate). A chat's transcript is saved after every turn, so nothing made is lost when a session stops. A turn the model cannot
take (unreadable, NaN or too-short audio, an empty turn, a prompt over the context limit: see --max-context)
is refused with one line and recorded in the transcript's "refused" list; interactive chat then goes on, a
scripted one (--say, --script) stops there with what was made kept and exit code 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ualm_nemo.data.formatting import AudioIn
from ualm_nemo.inference import reasoning
from ualm_nemo.inference.cli import add_enhancer_arg, add_generation_args, add_model_args, audio_format, \
    check_paths, generation_config, load_inference
from ualm_nemo.inference.pipeline import InputRejected, check_clip
from ualm_nemo.inference.transcript import Step, Transcript

MODES = ("understand", "chat", "enrich", "reflect")


def load_clip(path: str) -> tuple[str, AudioIn]:
    """A file -> (its name, 16 kHz mono clip); InputRejected (one line naming the file) when the model cannot
    listen to it: unreadable, NaN / infinite samples, shorter than one encoder frame."""
    from ualm_nemo.data.raw import load_audio

    try:
        wav = load_audio(path)
    except Exception as err:  # soundfile raises several types for unreadable files
        raise InputRejected("audio", f"cannot read audio {path}: {err}") from err
    check_clip(wav, f"audio {path}")
    return path, AudioIn(wav)


def read_audio(path: str, parser: argparse.ArgumentParser) -> tuple[str, AudioIn]:
    """``load_clip``, a refusal ending the command with one line (before a session has started)."""
    try:
        return load_clip(path)
    except InputRejected as err:
        parser.error(str(err))
        raise  # unreachable: parser.error exits


def _script(path: str, parser: argparse.ArgumentParser) -> dict:
    try:
        script = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        parser.error(f"--script {path}: {err}")
    if not isinstance(script, dict) or script.get("mode") not in MODES:
        parser.error(f"--script {path}: needs a json object with \"mode\" in {MODES}")
    key = "prompts" if script["mode"] in ("enrich", "reflect") else "turns"
    if not isinstance(script.get(key), list) or not script[key]:
        parser.error(f"--script {path}: mode {script['mode']!r} needs a non-empty list {key!r}")
    for k, turn in enumerate(script[key] if key == "turns" else []):
        if not _is_turn(turn):
            parser.error(f"--script {path}: turn {k} must be {{\"text\": str, \"audio\": [file, ...]}}")
    return script


def _is_turn(turn) -> bool:
    """A script turn as run_dialogue reads it: an object with an optional text and an optional list of files."""
    audio = turn.get("audio", []) if isinstance(turn, dict) else None
    return (isinstance(turn, dict) and isinstance(turn.get("text", ""), str) and isinstance(audio, list)
            and all(isinstance(a, str) for a in audio))


def _turns_from(args: argparse.Namespace) -> list[dict]:
    if args.mode == "understand":
        return [{"text": args.question or "", "audio": args.audio or []}]
    return [{"text": t, "audio": []} for t in args.say or []]


def session_folder(out_dir: str, parser: argparse.ArgumentParser) -> Path:
    """A new folder for this run under ``out_dir``, named by its UTC start time (``-2``, ``-3``, ... if taken):
    runs never overwrite each other's transcripts. A folder that cannot be made ends with one line."""
    stamp, n = time.strftime("%Y%m%d-%H%M%S", time.gmtime()), 1
    while True:
        folder = Path(out_dir) / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            n += 1
        except OSError as err:
            parser.error(f"--out-dir {out_dir}: cannot make {folder}: {err}")


def run_understand(infer, turn: dict, args, parser, cfg) -> Transcript:
    """One question about the audio, answered in text (a refused question ends the command, nothing written)."""
    clips = [read_audio(p, parser) for p in turn.get("audio", [])]
    if not clips:
        parser.error("understand: give at least one --audio file")
    if not turn.get("text", "").strip():
        parser.error("understand: give a --question")
    try:
        request = infer.prepare([("user", [c for _, c in clips] + ["\n" + turn["text"]])], "text", args.seed, cfg)
    except InputRejected as err:
        parser.error(f"understand: {err}")
    reply = infer.decode([request], cfg)[0]
    transcript = Transcript("understand")
    transcript.add(Step("user", "question", turn["text"], audio_paths=[n for n, _ in clips]))
    transcript.add(Step.from_reply("answer", reply))
    print(reply.text)
    print(f"transcript: {transcript.save(session_folder(args.out_dir, parser))}")
    return transcript


def run_dialogue(infer, turns: list[dict] | None, args, cfg, folder: Path) -> int:
    """Turns from a list (scripted: stops at a refused turn, exit code 1) or the terminal (``turns=None``: a
    refused turn is reported and the session goes on); the transcript is saved after every turn."""
    dialogue = reasoning.Dialogue(infer, seed=args.seed, cfg=cfg)
    transcript, code = dialogue.transcript, 0
    transcript.meta["audio_format"] = audio_format(infer, args.enhancer)
    for n, turn in enumerate(turns if turns is not None else _interactive(), 1):
        try:
            reply = dialogue.say(turn.get("text", ""), [load_clip(p) for p in turn.get("audio", [])])
        except InputRejected as err:
            print(f"chat: turn {n} refused: {err}", file=sys.stderr)
            transcript.meta.setdefault("refused", []).append({"turn": n, "reason": str(err)})
            code = 1 if turns is not None else 0
        else:
            _show(reply)
        transcript.save(folder)
        if code:
            break
    print(f"transcript: {transcript.save(folder)}")
    return code


def _interactive():
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
    add_enhancer_arg(parser)
    parser.add_argument("--audio", action="append", help="understand: an audio file (repeatable)")
    parser.add_argument("--question", help="understand: the question about the audio")
    parser.add_argument("--say", action="append", help="chat: a user turn (repeatable); none = interactive")
    parser.add_argument("--prompt", action="append", help="enrich / reflect: a prompt (repeatable)")
    parser.add_argument("--script", help="script mode: a json file (see above)")
    parser.add_argument("--out-dir", default="chat_out", help="each run writes into a new folder under it "
                                                               "(its UTC start time)")
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
    if Path(args.out_dir).exists() and not Path(args.out_dir).is_dir():
        parser.error(f"--out-dir {args.out_dir}: not a folder")
    infer = load_inference(args, parser)
    if mode in ("understand", "reflect") and not infer.listens:
        parser.error(f"{mode}: this checkpoint has no audio input (model.audio_in.enabled=false)")
    turns = script["turns"] if script and mode in ("understand", "chat") else _turns_from(args)
    if mode == "understand":
        run_understand(infer, turns[0], args, parser, cfg)
        return 0
    if mode == "chat":
        return run_dialogue(infer, turns or None, args, cfg, session_folder(args.out_dir, parser))
    run = reasoning.enrich if mode == "enrich" else reasoning.self_reflect
    try:
        transcripts = run(infer, prompts, [args.seed + k for k in range(len(prompts))], cfg)
    except InputRejected as err:
        parser.error(f"{mode}: {err}")
    folder = session_folder(args.out_dir, parser)
    for k, transcript in enumerate(transcripts):
        transcript.meta["audio_format"] = audio_format(infer, args.enhancer)
        path = transcript.save(folder, "transcript" if len(transcripts) == 1 else f"transcript_{k:03d}")
        for step in transcript.steps:
            if step.role == "assistant":
                print(f"[{k}] {step.name}: {step.text or ''}{' [audio]' if step.audio else ''}")
        print(f"transcript: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
