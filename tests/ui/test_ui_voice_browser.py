"""The chat page's voice mode in headless Chromium against the REAL server serving a tiny random Qwen3-Omni:
Chromium's fake microphone plays a WAV file, the page records it, sends it as an input_audio part asking for
a spoken answer, plays the delta.audio chunks as they stream (while the text is still being written) and
shows the transcript."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pytest
import soundfile
import torch

from asr_checkpoints import speechlike
from browser import BROWSER_TESTS, microphone_page, page_expect, screenshot
from server_utils import BackgroundServer
from qwenstack.engine.engine import EngineConfig
from qwenstack.models.registry import load_model
from qwenstack.serving.app import create_app
from qwenstack.serving.config import ServerConfig
from qwenstack.serving.served import build_served_model
from qwenstack.tokenizer import Tokenizer

pytestmark = BROWSER_TESTS
expect = page_expect()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, native_omni: Path) -> Iterator[BackgroundServer]:
    root = tmp_path_factory.mktemp("ui-voice")
    # max_model_len bounds the random Thinker's answer (it never says EOS); the speech stops after 2 s of it,
    # so text keeps streaming after the audio began
    model = load_model(native_omni, dtype=torch.float32)
    # The recorded prompt changes with the fake microphone's timing, and a random Talker draws its EOS code
    # about once in 80 frames, so on some prompts it fell silent after 3 frames. Suppressing EOS with the
    # other control codes keeps every answer at the 2 s bound this test checks.
    control = list(range(model.talker.args.text.vocab_size - 1024, model.talker.args.text.vocab_size))
    model.talker.suppressed_codes = lambda: control
    served = build_served_model("omni", model, Tokenizer.from_dir(native_omni),
                                EngineConfig(block_size=8, kv_cache_memory=2**24, max_model_len=160),
                                hf_config=json.loads((native_omni / "config.json").read_text()), model_dir=native_omni)
    config = ServerConfig(ui_db_path=str(root / "chats.db"), max_speech_seconds=2.0, speech_seconds_per_token=0.08)
    with BackgroundServer(create_app([served], config)) as running:
        yield running
    served.engine.shutdown()


def test_voice_mode_records_sends_and_plays_the_streamed_answer(server: BackgroundServer, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    wav = tmp_path / "mic.wav"
    soundfile.write(str(wav), speechlike(3.0, seed=4, rate=48000), 48000, subtype="PCM_16")
    with sync_playwright() as p:
        browser, page, errors = microphone_page(p, server.url, wav)
        page.goto(server.url + "/")
        expect(page.locator('[data-testid="app"][data-ready="true"]')).to_be_attached()
        page.get_by_test_id("voice-button").click()
        panel = page.get_by_test_id("voice-panel")
        expect(page.get_by_test_id("voice-model")).to_have_value("omni")
        expect(page.get_by_test_id("voice-voice").locator("option")).to_have_text(["chelsie", "ethan"])
        talk = page.get_by_test_id("voice-talk")
        talk.click()
        expect(page.get_by_test_id("voice-status")).to_have_text("Listening…")
        page.wait_for_timeout(1500)
        talk.click()  # Send
        expect(page.get_by_test_id("voice-user-turn")).to_have_count(1)
        expect(panel).to_have_attribute("data-stream-ended", "true", timeout=90_000)
        # the first audio chunk was playing while text deltas were still arriving
        expect(panel).to_have_attribute("data-played-before-end", "true")
        expect(panel).to_have_attribute("data-audio-state", "running")
        assert int(panel.get_attribute("data-audio-ms") or 0) >= 1000  # 2 s of speech, less pcm rounding
        expect(page.get_by_test_id("voice-transcript")).not_to_be_empty()
        screenshot(page, "voice-mode")
        assert not errors, errors
        browser.close()
