"""`qwenstack translate --to en speech.wav [-o out.wav]` and `qwenstack translate --to de --mic`: live speech
translation in-process, through the same TranslationSession the server's socket runs (ASR with rollback,
incremental translator, streaming TTS), fed 200 ms chunks.

A file goes as fast as the models allow, or at its own pace with --realtime (what a live speaker would
give); --mic records 24 kHz PCM16 from the first recorder found (arecord, sox's rec, ffmpeg) until Ctrl-C,
which flushes what is pending. The translation is printed as it is committed; the speech goes to -o
(wav/flac/...) or, with --play, to the speakers as it is made.
"""
from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from qwenstack.commands import Command

RATE = 24000
CHUNK_SECONDS = 0.2
RECORDERS = {
    "arecord": ["arecord", "-q", "-f", "S16_LE", "-c", "1", "-r", str(RATE), "-t", "raw"],
    "rec": ["rec", "-q", "-t", "raw", "-e", "signed", "-b", "16", "-c", "1", "-r", str(RATE), "-"],
    "ffmpeg": ["ffmpeg", "-loglevel", "quiet", "-f", "pulse", "-i", "default", "-ac", "1", "-ar", str(RATE),
               "-f", "s16le", "-"],
}
EPILOG = """examples:
  qwenstack translate --to en talk.wav -o talk.en.wav --asr Qwen/Qwen3-ASR-1.7B --llm Qwen/Qwen3-8B \\
      --tts Qwen/Qwen3-TTS-12Hz-1.7B-CustomVoice
  qwenstack translate --to de --mic --play --asr ... --llm ... --tts ...    # Ctrl-C ends and flushes"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("file", nargs="?", type=Path, help="audio to translate (WAV, FLAC, MP3, ...)")
    parser.add_argument("--to", required=True, help="target language (ISO code such as en, de, zh)")
    parser.add_argument("--asr", required=True, help="Qwen3-ASR model id or directory")
    parser.add_argument("--llm", required=True, help="Qwen3 model id or directory that translates")
    parser.add_argument("--tts", required=True, help="Qwen3-TTS CustomVoice/VoiceDesign checkpoint directory")
    parser.add_argument("--voice", default=None, help="a speaker of the TTS model (default: its first)")
    parser.add_argument("--mic", action="store_true", help="translate the microphone until Ctrl-C")
    parser.add_argument("--realtime", action="store_true", help="feed a file at its own pace, not as fast as possible")
    parser.add_argument("-o", "--output", type=Path, default=None, help="write the translated speech here")
    parser.add_argument("--play", action="store_true", help="play the translated speech as it is made")
    parser.add_argument("--quiet", "-q", action="store_true", help="print only the final translation")


async def _feed_file(session: Any, samples: Any, realtime: bool) -> None:
    step = int(RATE * CHUNK_SECONDS)
    start = time.monotonic()
    for n, i in enumerate(range(0, len(samples), step)):
        session.append(samples[i:i + step])
        await asyncio.sleep(max(0.0, start + (n + 1) * CHUNK_SECONDS - time.monotonic()) if realtime else 0)


async def _feed_mic(session: Any, recorder: list[str]) -> None:
    from qwenstack.audio.decode import pcm16_to_float

    proc = await asyncio.create_subprocess_exec(*recorder, stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    try:
        while True:
            data = await proc.stdout.readexactly(int(RATE * CHUNK_SECONDS) * 2)
            session.append(pcm16_to_float(data))
    except (asyncio.CancelledError, asyncio.IncompleteReadError):
        pass
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()


async def _translate(args: argparse.Namespace, pipeline: Any, samples: Any, recorder: list[str] | None,
                     sink: Any) -> str:
    from qwenstack.translate.events import Closed, OutputAudio, OutputTranscript, SessionFailed
    from qwenstack.translate.session import SessionSettings, TranslationSession

    session = TranslationSession(pipeline, SessionSettings(language=args.to, voice=args.voice, tentative=False))
    session.start()
    feeder = asyncio.ensure_future(_feed_mic(session, recorder) if recorder else
                                   _feed_file(session, samples, args.realtime))
    translation = ""

    async def drain() -> None:
        nonlocal translation
        while True:
            event = await session.next_event()
            if isinstance(event, OutputTranscript) and event.delta:
                translation += event.delta
                if not args.quiet:
                    print(event.delta, end="", flush=True)
            elif isinstance(event, OutputAudio):
                sink(event.samples)
            elif isinstance(event, SessionFailed):
                raise SystemExit(f"qwenstack translate: {event.message}")
            elif isinstance(event, Closed):
                return

    reader = asyncio.ensure_future(drain())
    try:
        await asyncio.wait({feeder, reader}, return_when=asyncio.FIRST_COMPLETED) if recorder else await feeder
    except asyncio.CancelledError:
        pass
    feeder.cancel()
    await asyncio.gather(feeder, return_exceptions=True)
    await session.close()
    await reader
    if not args.quiet:
        print()
    return translation


def run(args: argparse.Namespace) -> int:
    if bool(args.file) == bool(args.mic):
        print("qwenstack translate: give an audio FILE or --mic", file=sys.stderr)
        return 2
    recorder = None
    if args.mic:
        name = next((n for n in RECORDERS if shutil.which(n)), None)
        if name is None:
            print(f"qwenstack translate: no recorder found (install one of: {', '.join(RECORDERS)})", file=sys.stderr)
            return 1
        recorder = RECORDERS[name]
    from qwenstack.translate.translator import target_code

    try:
        target_code(args.to)
    except ValueError as exc:
        print(f"qwenstack translate: {exc}", file=sys.stderr)
        return 2
    import numpy as np

    from qwenstack.audio.decode import decode_audio
    from qwenstack.serving.config import TranslationSpec
    from qwenstack.serving.translations import load_pipeline
    from qwenstack.tts.audio_format import pcm16

    samples = None
    if args.file is not None:
        samples = decode_audio(args.file.read_bytes(), target_rate=RATE).samples
    pipeline, engines = load_pipeline(TranslationSpec(asr=args.asr, llm=args.llm, tts=args.tts, voice=args.voice))
    rate = pipeline.tts.sample_rate
    chunks: list[Any] = []
    player = None
    if args.play:
        from qwenstack.commands.say import PLAYERS

        found = next((n for n in PLAYERS if shutil.which(n)), None)
        if found is None:
            print(f"qwenstack translate: no audio player found (install one of: {', '.join(PLAYERS)})", file=sys.stderr)
            return 1
        player = subprocess.Popen([a.format(rate=rate) for a in PLAYERS[found]], stdin=subprocess.PIPE)

    def sink(part: Any) -> None:
        chunks.append(part)
        if player is not None and player.stdin is not None:
            import torch

            player.stdin.write(pcm16(torch.from_numpy(part)))
            player.stdin.flush()

    try:
        asyncio.run(_translate(args, pipeline, samples, recorder, sink))
    except KeyboardInterrupt:
        pass
    finally:
        for engine in engines:
            engine.shutdown()
        if player is not None and player.stdin is not None:
            player.stdin.close()
            player.wait()
    if args.output is not None:
        import soundfile

        audio = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
        soundfile.write(str(args.output), audio, rate)
        print(f"wrote {len(audio) / rate:.2f} s of translated speech to {args.output}", file=sys.stderr)
    return 0


COMMANDS = [Command("translate", "Translate speech live: a file or the microphone -> translated text and speech",
                    add_arguments, run, description=__doc__)]
