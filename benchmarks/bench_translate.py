"""Live-translation lag on scripted input with tiny-shaped models on this CPU: the end of each source
sentence -> the first audio of its translation (median, p95), and each stage's share.

    python benchmarks/bench_translate.py

The clip is four espeak-ng sentences streamed in 200 ms chunks in real time through a TranslationSession.
The ASR is the tests' scripted Qwen3-ASR (its decodes cost what a tiny ASR costs) whose answer is cut to the
words already spoken (words spread evenly over each espeak sentence): it stands in for a real model whose
transcript follows the audio, so the ASR share includes the re-feed cadence (2 s) and the 5-token rollback.
Then a planner estimate of the same lag for Qwen3-ASR-1.7B + Qwen3-8B + Qwen3-TTS-1.7B.
"""
from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "scripts")]

from translate_fixtures import SENTENCES, build_parts, build_pipeline, spoken_clip  # noqa: E402
from qwenstack.audio.asr import ASR_TEXT  # noqa: E402
from qwenstack.translate.events import OutputAudio, OutputTranscript  # noqa: E402
from qwenstack.translate.session import SessionSettings, TranslationSession  # noqa: E402


def aligned_asr(pipeline: Any, ends: list[float]) -> None:
    """The ASR's answers cut to the words whose audio has ended (evenly spread within a sentence)."""
    tokenizer = pipeline.asr.tokenizer
    starts = [0.0] + ends[:-1]
    word_ends: list[tuple[float, int]] = []  # (time the word ends, characters of transcript through it)
    chars = 0
    for sentence, start, end in zip(SENTENCES, starts, ends):
        words = sentence.split()
        for i, word in enumerate(words):
            chars += len(word) + (1 if chars else 0)
            word_ends.append((start + (end - start) * (i + 1) / len(words), chars))
    inner = pipeline.generate

    def generate(model: Any, prefix: str) -> Any:
        run = inner(model, prefix)
        if model is not pipeline.asr:
            return run

        async def cut(prompt_ids: list[int], params: Any, multimodal: Any = None) -> list[int]:
            out = await run(prompt_ids, params, multimodal)
            heard = multimodal.audios[0].seconds
            allowed = max([c for t, c in word_ends if t <= heard], default=0)
            forced = tokenizer.decode(prompt_ids, skip_special_tokens=True).split(ASR_TEXT, 1)
            have = len(forced[1].lstrip()) if len(forced) > 1 else 0
            keep = []
            for token in out:  # keep tokens while the transcript stays within what was spoken
                text = tokenizer.decode(prompt_ids + keep + [token], skip_special_tokens=True).split(ASR_TEXT, 1)
                if len(text) > 1 and len(text[1].lstrip()) > max(allowed, have):
                    break
                keep.append(token)
            return keep

        return cut

    pipeline.generate = generate


async def stream(pipeline: Any, samples: np.ndarray, ends: list[float]) -> dict[str, list[float]]:
    session = TranslationSession(pipeline, SessionSettings(language="de", tentative=False))
    session.start()
    t0 = time.monotonic()
    step = 4800
    first_audio: list[float] = []
    committed: list[float] = []
    pending = 0  # units translated, waiting for their first audio

    async def read() -> None:
        nonlocal pending
        seen_audio_for = 0
        while True:
            event = await session.next_event()
            now = time.monotonic() - t0
            if isinstance(event, OutputTranscript) and event.delta:
                committed.append(now)
            elif isinstance(event, OutputAudio) and event.lag_ms:
                first_audio.append(now)
                seen_audio_for += 1
            elif not isinstance(event, (OutputTranscript, OutputAudio)) and type(event).__name__ == "Closed":
                return

    reader = asyncio.ensure_future(read())
    for n, i in enumerate(range(0, len(samples), step)):
        session.append(samples[i:i + step])
        await asyncio.sleep(max(0.0, t0 + (n + 1) * 0.2 - time.monotonic()))
    for _ in range(12):  # the speaker keeps the channel open with silence (as OpenAI asks), 2.4 s
        session.append(np.zeros(step, np.float32))
        await asyncio.sleep(0.2)
    await session.close()
    await reader
    return {"first_audio": first_audio, "committed": committed}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        parts = build_parts(Path(tmp))
        pipeline = build_pipeline(parts)
        samples, ends = spoken_clip(Path(tmp))
        aligned_asr(pipeline, ends)
        runs = [asyncio.run(stream(pipeline, samples, ends)) for _ in range(3)]
    from qwenstack.translate.units import split_units

    units = split_units(" ".join(SENTENCES), pipeline.settings.units)
    closing = [i for i, u in enumerate(units) if u.rstrip()[-1] in ".!?"]  # the unit that ends each sentence
    lags, mt_tts = [], []
    for r in runs:
        print("first audio at", [round(t, 2) for t in r["first_audio"]], "sentence ends", [round(e, 2) for e in ends])
        assert len(r["first_audio"]) == len(units), "every unit gets speech"
        lags += [r["first_audio"][u] - end for u, end in zip(closing, ends)]
        mt_tts += [a - c for a, c in zip(r["first_audio"], r["committed"])]
    lags.sort()
    p95 = lags[min(len(lags) - 1, int(round(0.95 * (len(lags) - 1))))]
    print(f"lag end-of-sentence -> first translated audio: median {statistics.median(lags):.2f} s, "
          f"p95 {p95:.2f} s over {len(lags)} sentences; translation published -> first audio median "
          f"{statistics.median(mt_tts):.3f} s")


if __name__ == "__main__":
    main()
