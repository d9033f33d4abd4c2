"""The chat page's audio features in headless Chromium against the REAL server serving a scripted Qwen3-ASR:
the transcription view (a file streamed to text, srt subtitles, a microphone recording), and the composer's
microphone button, which attaches a WAV recording that the model then hears. Chromium's fake microphone (a
beeping tone) stands in for a real one."""
from __future__ import annotations

from pathlib import Path

import pytest

from asr_checkpoints import build_scripted_asr, speechlike, wav_bytes
from playwright.sync_api import sync_playwright

from browser import BROWSER_TESTS, CHROMIUM, CHROMIUM_ARGS, page_expect
from server_utils import BackgroundServer, tiny_served_model
from test_server_audio import _served
from qwenstack.serving.app import create_app
from qwenstack.serving.config import ServerConfig

pytestmark = BROWSER_TESTS

expect = page_expect()


ANSWER = "hello there, this is a test."


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_qwen3: Path):
    root = tmp_path_factory.mktemp("ui-audio")
    asr = _served("asr", build_scripted_asr(root / "asr", "language English<asr_text>" + ANSWER))
    app = create_app([asr, tiny_served_model(tiny_qwen3, "tiny")], ServerConfig(ui_db_path=str(root / "chats.db")))
    with BackgroundServer(app) as running:
        yield running


@pytest.fixture(scope="module")
def page(server: BackgroundServer):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS + [
            "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"])
        context = browser.new_context(viewport={"width": 1280, "height": 820})
        context.grant_permissions(["microphone"], origin=server.url)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(server.url + "/")
        expect(page.locator('[data-testid="app"][data-ready="true"]')).to_be_attached()
        yield page
        assert not errors, f"JavaScript errors on the page: {errors}"
        browser.close()


def test_transcription_view_file_srt_and_recording(page, tmp_path: Path) -> None:
    clip = tmp_path / "clip.wav"
    clip.write_bytes(wav_bytes(speechlike(2.0, seed=1)))
    page.get_by_test_id("transcribe-button").click()
    panel = page.get_by_test_id("transcribe-panel")
    expect(panel).to_be_visible()
    expect(page.get_by_test_id("transcribe-model")).to_have_value("asr")  # the only model that takes audio
    page.get_by_test_id("transcribe-file").set_input_files(str(clip))
    page.get_by_test_id("transcribe-start").click()
    expect(page.get_by_test_id("transcript-output")).to_have_text(ANSWER)
    expect(page.get_by_test_id("transcribe-status")).to_have_text("Done: 2.0 s of audio.")
    page.get_by_test_id("transcribe-format").select_option("srt")
    page.get_by_test_id("transcribe-start").click()
    expect(page.get_by_test_id("transcript-output")).to_have_text(f"1\n00:00:00,000 --> 00:00:02,000\n{ANSWER}\n")
    # a recording from the (fake) microphone instead of the file
    page.get_by_test_id("transcribe-format").select_option("text")
    page.get_by_test_id("transcribe-record").click()
    expect(page.get_by_test_id("transcribe-status")).to_have_text("Recording…")
    page.wait_for_timeout(1500)
    page.get_by_test_id("transcribe-record").click()
    expect(page.get_by_test_id("transcribe-status")).to_contain_text("Recorded")
    page.get_by_test_id("transcribe-start").click()
    expect(page.get_by_test_id("transcript-output")).to_have_text(ANSWER)
    page.get_by_test_id("transcribe-close").click()
    expect(panel).to_be_hidden()


def test_composer_records_audio_for_audio_models(page) -> None:
    page.get_by_test_id("model-select").select_option("tiny")
    expect(page.get_by_test_id("record-button")).to_be_hidden()  # a text-only model cannot hear
    page.get_by_test_id("model-select").select_option("asr")
    record = page.get_by_test_id("record-button")
    expect(record).to_be_visible()
    record.click()
    expect(record).to_have_attribute("aria-pressed", "true")
    page.wait_for_timeout(1200)
    record.click()
    expect(page.get_by_test_id("attachment-preview")).to_have_count(1)
    page.get_by_test_id("send-button").click()
    answer = page.locator('[data-testid="message"][data-role="assistant"][data-streaming="false"]')
    expect(answer).to_have_count(1)
    expect(answer).to_contain_text(ANSWER)
    expect(page.locator('[data-testid="message"][data-role="user"] audio')).to_have_count(1)
