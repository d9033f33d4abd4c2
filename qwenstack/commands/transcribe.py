"""`qwenstack transcribe FILE... [--model M] [--format srt]`: speech to text with a Qwen3-ASR model, offline.

Long files are cut at silences into segments of at most 30 s (never mid-word when there is a pause), all
segments of a file run as one batch, and a progress bar on stderr counts them. srt/vtt use the segment
times. Several files print one after another (or go to --output-dir as FILE.<format>)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qwenstack.commands import Command
from qwenstack.commands._common import add_model_options

FORMATS = ("text", "json", "verbose_json", "srt", "vtt")
EPILOG = """examples:
  qwenstack transcribe meeting.mp3 --model Qwen/Qwen3-ASR-0.6B
  qwenstack transcribe talk.flac --model Qwen/Qwen3-ASR-1.7B --format srt > talk.srt
  qwenstack transcribe *.wav --model ./Qwen3-ASR-0.6B --language en --output-dir transcripts/"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE",
                        help="audio files (WAV, FLAC, OGG/Opus, MP3, ...)")
    parser.add_argument("--model", "-m", required=True, help="a Qwen3-ASR model id or directory")
    parser.add_argument("--format", "-f", choices=FORMATS, default="text", help="output format (default: text)")
    parser.add_argument("--language", default=None, help="force the language (ISO code like 'en', or 'English')")
    parser.add_argument("--prompt", default="", help="context for the model: names, terms, the topic")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (the default) is greedy")
    parser.add_argument("--segment-seconds", type=float, default=30.0, metavar="S",
                        help="longest piece a file is cut into, at the quietest moment (default: 30)")
    parser.add_argument("--output-dir", type=Path, default=None, help="write FILE.<format> there instead of stdout")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    add_model_options(parser)


def _progress(name: str, quiet: bool):
    def show(done: int, total: int) -> None:
        if quiet:
            return
        width = 30
        filled = width * done // total
        sys.stderr.write(f"\r{name[:40]:40} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} segments")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()
    return show


def render(transcript, fmt: str) -> str:
    from qwenstack.audio.asr import language_code
    from qwenstack.audio.subtitles import to_srt, to_vtt

    timed = [(s.start, s.end, s.text) for s in transcript.segments]
    if fmt == "text":
        return transcript.text + "\n"
    if fmt == "srt":
        return to_srt(timed)
    if fmt == "vtt":
        return to_vtt(timed)
    body = {"text": transcript.text}
    if fmt == "verbose_json":
        body.update(language=(transcript.language or "").lower(), language_code=language_code(transcript.language),
                    duration=round(transcript.seconds, 3),
                    segments=[{"id": i, "start": round(a, 3), "end": round(b, 3), "text": t}
                              for i, (a, b, t) in enumerate(timed)])
    return json.dumps(body, ensure_ascii=False, indent=2) + "\n"


def run(args: argparse.Namespace) -> int:
    from qwenstack.audio.asr import language_name
    from qwenstack.audio.decode import AudioError, decode_audio
    from qwenstack.audio.transcribe import prompter_of, transcribe_samples
    from qwenstack.commands._common import load_llm

    missing = [str(f) for f in args.files if not f.is_file()]
    if missing:
        raise ValueError(f"no such file: {', '.join(missing)}")
    language = language_name(args.language)
    llm = load_llm(args)
    prompter_of(llm)  # fails early, with a clear message, for a model without an audio encoder
    if args.output_dir is not None:
        args.output_dir.mkdir(parents=True, exist_ok=True)
    status = 0
    for path in args.files:
        try:
            audio = decode_audio(path.read_bytes())
        except AudioError as exc:
            print(f"qwenstack transcribe: {path}: {exc}", file=sys.stderr)
            status = 1
            continue
        transcript = transcribe_samples(llm, audio.samples, language=language, context=args.prompt,
                                        temperature=args.temperature, max_segment_seconds=args.segment_seconds,
                                        on_segment=_progress(path.name, args.quiet))
        text = render(transcript, args.format)
        if args.output_dir is not None:
            suffix = {"verbose_json": "json"}.get(args.format, args.format)
            (args.output_dir / f"{path.stem}.{suffix}").write_text(text, encoding="utf-8")
        else:
            if len(args.files) > 1:
                print(f"=== {path}")
            sys.stdout.write(text)
            sys.stdout.flush()
    return status


COMMANDS = [Command("transcribe", "Transcribe audio files with a Qwen3-ASR model (offline, long files cut at "
                    "silences)", add_arguments, run, order=35, description=__doc__)]
