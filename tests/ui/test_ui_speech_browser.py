"""The chat page's speaker button in Chromium: a voice picker appears when the server lists voices, and the
button streams the answer's audio from /v1/audio/speech, playing before the last chunk has arrived."""
from __future__ import annotations

import asyncio
import struct

import pytest
from fastapi import Request
from fastapi.responses import StreamingResponse

from browser import BROWSER_TESTS, ServerThread, assistants, launch_chromium, page_expect, send
from test_ui_browser import make_fake_server
from qwenstack.serving.store import ChatStore

pytestmark = [*BROWSER_TESTS, pytest.mark.timeout(180)]

expect = page_expect()

CHUNKS = 6


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    store = ChatStore(tmp_path_factory.mktemp("ui") / "chats.db")
    # the server lists its speech model in /v1/models, as qwenstack's does: the page must not offer it for chat
    app = make_fake_server(store, extra_models=({"id": "tts", "object": "model", "owned_by": "test",
                                                 "capabilities": ["speech"], "voices": ["vivian", "eric"]},))
    app.state.speech = []
    app.state.speech_chunks_sent = 0

    @app.get("/v1/audio/voices")
    def voices() -> dict:
        return {"object": "list", "data": [{"id": "vivian", "model": "tts", "type": "builtin"},
                                           {"id": "eric", "model": "tts", "type": "builtin"}]}

    @app.post("/v1/audio/speech")
    async def speech(request: Request) -> StreamingResponse:
        app.state.speech.append(await request.json())
        app.state.speech_chunks_sent = 0

        async def pcm():
            for i in range(CHUNKS):
                tone = [int(8000 * ((j // 20) % 2 * 2 - 1)) for j in range(4800)]  # 0.2 s square wave
                yield struct.pack(f"<{len(tone)}h", *tone)
                app.state.speech_chunks_sent = i + 1
                await asyncio.sleep(0.3)

        return StreamingResponse(pcm(), media_type="audio/pcm")

    with ServerThread(app) as running:
        running.app = app
        yield running
    store.close()


def test_speaker_button_streams_the_answer(server):
    with launch_chromium() as browser:
        context = browser.new_context(viewport={"width": 1280, "height": 820})
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(server.url + "/")
        expect(page.locator('[data-testid="app"][data-ready="true"]')).to_be_attached(timeout=15_000)
        expect(page.get_by_test_id("voice-select")).to_be_visible()
        expect(page.get_by_test_id("model-select").locator("option")).to_have_count(2)  # the chat models only
        expect(page.get_by_test_id("model-select").locator("option[value=tts]")).to_have_count(0)
        page.get_by_test_id("voice-select").select_option(label="🔊 eric")
        send(page, "Say something short.")
        answer = assistants(page).last
        button = answer.get_by_test_id("speak-button")
        expect(button).to_be_visible()
        button.click()
        # Playback starts with the first chunk, while the server is still sending the rest.
        expect(button).to_have_attribute("data-state", "playing", timeout=10_000)
        assert server.app.state.speech_chunks_sent < CHUNKS
        body = server.app.state.speech[-1]
        assert body["voice"] == "eric" and body["model"] == "tts" and body["response_format"] == "pcm"
        assert body["input"].startswith("Hello from fake-qwen3-think!") and "**" not in body["input"]
        expect(button).to_have_attribute("data-state", "idle", timeout=15_000)  # played out
        context.close()
        assert not errors, errors
