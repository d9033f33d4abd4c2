"""`qwenstack say "text" --model DIR [-o out.wav | --play]`: speech from a Qwen3-TTS checkpoint, written or played
as it is made (the same batched engine and exact streaming codec as the server).

--play pipes 16-bit PCM to the first player found on PATH (aplay, paplay, play from sox, ffplay).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from qwenstack.commands import Command

PLAYERS = {
    "aplay": ["aplay", "-q", "-f", "S16_LE", "-c", "1", "-r", "{rate}"],
    "paplay": ["paplay", "--raw", "--format=s16le", "--channels=1", "--rate={rate}"],
    "play": ["play", "-q", "-t", "raw", "-e", "signed", "-b", "16", "-c", "1", "-r", "{rate}", "-"],
    "ffplay": ["ffplay", "-nodisp", "-autoexit", "-loglevel", "quiet", "-f", "s16le", "-ac", "1", "-ar", "{rate}", "-"],
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text", help="what to say")
    parser.add_argument("--model", required=True, help="a Qwen3-TTS checkpoint directory (with speech_tokenizer/)")
    out = parser.add_mutually_exclusive_group()
    out.add_argument("-o", "--output", help="write a .wav (or .flac/.mp3/.ogg by extension) here")
    out.add_argument("--play", action="store_true", help="play through the speakers as the audio is made")
    parser.add_argument("--voice", default=None, help="a speaker of a CustomVoice model")
    parser.add_argument("--instructions", default=None, help="how to speak (VoiceDesign: the voice itself)")
    parser.add_argument("--language", default="auto")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--max-frames", type=int, default=2047, help="at most this many 80 ms frames")


def run(args: argparse.Namespace) -> int:
    import torch

    from qwenstack.tts.audio_format import pcm16
    from qwenstack.tts.engine import SpeechEngine, SpeechParams, SpeechRequest
    from qwenstack.tts.loader import load_tts

    if not args.output and not args.play:
        print("qwenstack say: give -o FILE or --play", file=sys.stderr)
        return 2
    tts = load_tts(args.model)
    voice = args.voice or (tts.speakers[0] if tts.kind == "custom_voice" and tts.speakers else None)
    if tts.kind == "base":
        print("qwenstack say: a Base model speaks in a registered voice; use the server's /v1/audio/voices",
              file=sys.stderr)
        return 2
    instruct = tts.instruct_ids(args.instructions) if args.instructions else None
    prompt = tts.model.build_prompt(tts.text_ids(args.text), args.language, voice, instruct_ids=instruct)
    engine = SpeechEngine(tts.model, tts.codec.decoder)
    engine.add(SpeechRequest("say", prompt, SpeechParams(seed=args.seed, max_frames=args.max_frames)))
    rate = tts.sample_rate
    if args.play:
        player = next((name for name in PLAYERS if shutil.which(name)), None)
        if player is None:
            print(f"qwenstack say: no audio player found (install one of: {', '.join(PLAYERS)})", file=sys.stderr)
            return 1
        proc = subprocess.Popen([a.format(rate=rate) for a in PLAYERS[player]], stdin=subprocess.PIPE)
        assert proc.stdin is not None
        while engine.has_work():
            for chunk in engine.step():
                if chunk.samples.numel():
                    proc.stdin.write(pcm16(chunk.samples))
                    proc.stdin.flush()
        proc.stdin.close()
        return proc.wait()
    import soundfile

    path = Path(args.output)
    fmt = {".flac": "FLAC", ".mp3": "MP3", ".ogg": "OGG", ".opus": "OGG"}.get(path.suffix.lower(), "WAV")
    subtype = {"MP3": "MPEG_LAYER_III", "OGG": "OPUS", "FLAC": "PCM_16"}.get(fmt, "PCM_16")
    samples = 0
    with soundfile.SoundFile(str(path), "w", rate, 1, format=fmt, subtype=subtype) as f:
        while engine.has_work():
            for chunk in engine.step():
                if chunk.samples.numel():
                    f.write(chunk.samples.to(torch.float32).numpy())
                    samples += chunk.samples.numel()
    print(f"wrote {samples / rate:.2f} s of audio to {path}")
    return 0


COMMANDS = [Command("say", "Speak text with a Qwen3-TTS model (to a file or the speakers, streamed)",
                    add_arguments, run, description=__doc__)]
