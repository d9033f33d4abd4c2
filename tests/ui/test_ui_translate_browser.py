"""The page's Live translate view in headless Chromium against the real server: Chromium's fake capture
plays an espeak-ng WAV file as the microphone, the page streams it to /v1/realtime/translations, and both
transcripts and the translated speech come back (an API key is set, so the socket's browser subprotocol
carries it)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import re

import pytest
import soundfile

from browser import BROWSER_TESTS, microphone_page
from server_utils import BackgroundServer
from translate_fixtures import TRANSCRIPT, build_parts, build_pipeline, spoken_clip
from qwenstack.serving.app import create_app
from qwenstack.serving.config import ServerConfig
from qwenstack.serving.translations import registry_of

pytestmark = BROWSER_TESTS
KEY = "translate-secret"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    root = tmp_path_factory.mktemp("ui-translate")
    app = create_app([], ServerConfig(ui_db_path=str(root / "chats.db"), api_key=KEY))
    pipeline = build_pipeline(build_parts(root))
    registry_of(app).add(pipeline)
    with BackgroundServer(app) as running:
        yield running
    pipeline.asr.engine.shutdown()
    pipeline.llm.engine.shutdown()


def test_live_translate_view_with_a_wav_as_microphone(server: BackgroundServer, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    samples, _ = spoken_clip(tmp_path, rate=48000)
    wav = tmp_path / "mic.wav"
    soundfile.write(str(wav), samples, 48000, subtype="PCM_16")
    with sync_playwright() as p:
        browser, page, errors = microphone_page(p, server.url, wav)
        page.add_init_script(f"localStorage.setItem('qwenstack.apiKey', '{KEY}')")
        page.goto(server.url + "/")
        expect(page.locator('[data-testid="app"][data-ready="true"]')).to_be_attached(timeout=30_000)
        expect(page.get_by_test_id("model-select").locator("option", has_text="live-translate")).to_have_count(0)
        page.get_by_test_id("translate-button").click()
        panel = page.get_by_test_id("translate-panel")
        expect(page.get_by_test_id("translate-model")).to_have_value("live-translate")
        page.get_by_test_id("translate-language").select_option("de")
        page.get_by_test_id("translate-start").click()
        expect(page.get_by_test_id("translate-status")).to_have_text("Listening…", timeout=30_000)
        # the scripted ASR commits the transcript mid-stream; the translation and its speech follow
        expect(page.get_by_test_id("translate-output").locator("span").first).not_to_be_empty(timeout=60_000)
        page.wait_for_function("Number(document.querySelector('[data-testid=translate-panel]').dataset.audioMs) > 0",
                               timeout=60_000)
        expect(page.get_by_test_id("translate-lag")).to_have_text(re.compile(r"^\d+\.\d s$"))
        page.get_by_test_id("translate-start").click()  # stop: session.close flushes the rest
        expect(page.get_by_test_id("translate-status")).to_have_text("Done.", timeout=60_000)
        expect(page.get_by_test_id("translate-source").locator("span").first).to_have_text(TRANSCRIPT)
        assert int(panel.get_attribute("data-audio-ms") or 0) > 0
        assert not errors, errors
        browser.close()
