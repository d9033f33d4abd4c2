"""The chat page end to end in headless Chromium, against the REAL qwenstack server (`create_app`).

tests/ui/test_ui_browser.py drives the page against a fake OpenAI app; here the page, /api/ and /v1/ all come
from `create_app` serving scripted checkpoints (tests/scripted.py): real Qwen3 checkpoints whose greedy output
is a known thinking block then a known answer, so the test knows what must stream into the bubble. What only
a real server shows: the wire format the page reads is the one qwenstack really sends, Stop frees the
engine's KV blocks (the request is aborted in the engine, not just dropped by the browser), a prompt longer
than max_model_len comes back as a readable error, and a server started with an API key stays usable.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from browser import BROWSER_TESTS, assistants, launch_chromium, page_expect, screenshot, send
from scripted import CASES, build_case
from server_utils import BackgroundServer, tiny_served_model
from qwenstack.serving.app import create_app
from qwenstack.serving.config import ServerConfig

pytestmark = BROWSER_TESTS

expect = page_expect()


CHAT_MODEL = "scripted"  # think_answer, with a short context for the too-long-prompt error
LONG_MODEL = "scripted-long"  # long_think, its engine slowed so Stop lands mid-stream
MAX_MODEL_LEN = 256
STEP_DELAY_S = 0.1  # the long script is ~40 tokens: ~4 s of streaming
API_KEY = "sekret-test-key"

THINKING = "The user says hello. A short, friendly greeting fits."
ANSWER = "Hello! How can I help you today?"
assert CASES["think_answer"] == f"<think>\n{THINKING}\n</think>\n\n{ANSWER}"


def _slowed(served, delay: float):
    """Each engine step takes `delay` longer, so a long script streams for seconds instead of milliseconds."""
    engine = served.engine.engine
    step = engine.step

    def slow_step(*args, **kwargs):
        time.sleep(delay)
        return step(*args, **kwargs)

    engine.step = slow_step
    return served


def _models(root: Path) -> tuple[list, int]:
    chat = build_case(root / "chat", "think_answer")
    long = build_case(root / "long", "long_think")
    models = [tiny_served_model(chat.path, CHAT_MODEL, max_model_len=MAX_MODEL_LEN),
              _slowed(tiny_served_model(long.path, LONG_MODEL), STEP_DELAY_S)]
    return models, len(long.script_token_ids)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui-real")
    models, long_script_len = _models(root)
    app = create_app(models, ServerConfig(api_key=None, ui_db_path=str(root / "chats.db")))
    with BackgroundServer(app) as running:
        running.app = app
        running.models = {m.name: m for m in models}
        running.long_script_len = long_script_len
        yield running


@pytest.fixture(scope="module")
def browser():
    with launch_chromium() as b:
        yield b


def _open(browser, url: str, scheme: str = "light", ready: bool = True, routes: dict | None = None):
    context = browser.new_context(viewport={"width": 1280, "height": 820}, color_scheme=scheme)
    for pattern, handler in (routes or {}).items():
        context.route(pattern, handler)
    page = context.new_page()
    page.errors = []
    page.outside = []
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    page.on("request", lambda req: None if req.url.startswith((url, "data:", "blob:")) else page.outside.append(req.url))
    page.goto(url + "/")
    if ready:
        expect(page.locator('[data-testid="app"][data-ready="true"]')).to_be_attached()
    return context, page


def _close(context, page) -> None:
    context.close()
    assert not page.errors, f"JavaScript errors on the page: {page.errors}"
    assert not page.outside, f"the page asked for something outside qwenstack: {page.outside}"


@pytest.fixture
def page(browser, server):
    context, page = _open(browser, server.url)
    yield page
    _close(context, page)


def new_chat(page, model: str) -> None:
    page.get_by_test_id("new-chat").click()
    expect(page.get_by_test_id("empty-state")).to_be_visible()
    page.get_by_test_id("model-select").select_option(model)


def _engine_idle(engine) -> bool:
    return not engine.has_unfinished_requests() and \
        engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


# -------------------------------------------------------------------------------------------- tests

def test_answer_streams_with_the_scripts_thinking(page, server):
    new_chat(page, CHAT_MODEL)
    send(page, "Hello there")
    answer = assistants(page).last
    expect(answer.get_by_test_id("message-content")).to_have_text(ANSWER)
    expect(answer.get_by_test_id("message-error")).to_have_count(0)
    expect(answer.get_by_test_id("message-metrics")).to_contain_text(re.compile(r"TTFT \d+\.\d\d s · [\d.]+ tok/s"))

    # The thinking section holds the script's reasoning (reasoning_content from qwenstack's parser), folded
    # once the answer came; it expands and collapses.
    section = answer.get_by_test_id("thinking")
    toggle = answer.get_by_test_id("thinking-toggle")
    expect(toggle).to_have_text(re.compile(r"Thought for \d+\.\d s"))
    expect(section).not_to_have_attribute("open", "")
    toggle.click()
    expect(section).to_have_attribute("open", "")
    expect(section.get_by_test_id("thinking-content")).to_be_visible()
    expect(section.get_by_test_id("thinking-content")).to_have_text(THINKING)
    toggle.click()
    expect(section).not_to_have_attribute("open", "")

    # A second turn in the same conversation: the history goes back to the real server and it answers again.
    send(page, "And again")
    expect(assistants(page)).to_have_count(2)
    expect(assistants(page).last.get_by_test_id("message-content")).to_have_text(ANSWER)
    assert _engine_idle(server.models[CHAT_MODEL].engine.engine)


def test_live_stream_then_stop_aborts_the_request_in_the_engine(page, server):
    engine = server.models[LONG_MODEL].engine.engine
    assert _engine_idle(engine)
    generated_before = engine.counters.generation_tokens
    new_chat(page, LONG_MODEL)
    send(page, "Think it through", wait=False)

    live = page.locator('[data-role="assistant"][data-streaming="true"]')
    expect(live.get_by_test_id("thinking")).to_have_attribute("open", "")  # open while the model thinks
    expect(live.get_by_test_id("thinking-content")).to_contain_text("Step 2: weigh option 2.")
    assert engine.has_unfinished_requests(), "the request should still be running on the server"
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks
    page.get_by_test_id("stop-button").click()

    answer = assistants(page).last
    expect(answer).to_have_attribute("data-finish", "abort")
    expect(answer.get_by_test_id("message-stopped")).to_be_visible()
    expect(page.get_by_test_id("send-button")).to_be_visible()
    # The server saw the client go away and aborted the request: nothing left running, every KV block back.
    deadline = time.monotonic() + 10
    while not _engine_idle(engine) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not engine.has_unfinished_requests(), "a request is still running after Stop"
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks, "KV blocks not returned"
    generated = engine.counters.generation_tokens - generated_before
    assert generated < server.long_script_len, f"the script ran to its end ({generated} tokens): nothing was aborted"
    assert "The answer is 42." not in answer.inner_text()


def test_prompt_too_long_is_a_readable_error(page, server):
    new_chat(page, CHAT_MODEL)
    long_text = " ".join(f"paragraph {i} of a pasted document about rivers and mountains." for i in range(120))
    box = page.get_by_test_id("composer-input")
    box.fill(long_text)
    box.press("Enter")
    answer = assistants(page).last
    error = answer.get_by_test_id("message-error")
    expect(error).to_be_visible()
    text = error.inner_text()
    assert f"maximum context length is {MAX_MODEL_LEN} tokens" in text, text
    assert re.search(r"the prompt has \d+ tokens", text), text
    assert "{" not in text, f"raw JSON shown instead of the message: {text}"
    assert _engine_idle(server.models[CHAT_MODEL].engine.engine)
    # The conversation goes on: the failed turn is not resent with the next message.
    send(page, "Hello")
    expect(assistants(page).last.get_by_test_id("message-content")).to_have_text(ANSWER)


def test_reload_finds_the_conversation_and_screenshots(browser, server):
    for scheme in ("light", "dark"):
        context, page = _open(browser, server.url, scheme)
        if scheme == "light":
            new_chat(page, CHAT_MODEL)
            send(page, "Remember the LIGHTHOUSE")
            url = page.url
            assert re.search(r"#c=\w+", url)
        else:
            page.goto(url)
        page.reload()
        expect(page.locator('[data-testid="app"][data-ready="true"]')).to_be_attached()
        item = page.get_by_test_id("conversation-item").filter(has_text="Remember the LIGHTHOUSE")
        expect(item).to_have_count(1)
        expect(page.get_by_test_id("chat-title")).to_have_text("Remember the LIGHTHOUSE")
        expect(page.locator('[data-testid="message"][data-role="user"]').last).to_contain_text("LIGHTHOUSE")
        expect(assistants(page).last.get_by_test_id("message-content")).to_have_text(ANSWER)
        expect(page.get_by_test_id("model-select")).to_have_value(CHAT_MODEL)
        shot = screenshot(page, f"chat-real-server-{scheme}")
        assert shot.stat().st_size > 10_000
        _close(context, page)


# -------------------------------------------------------------------------------------------- API key

@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui-real-key")
    chat = build_case(root / "chat", "think_answer")
    app = create_app([tiny_served_model(chat.path, CHAT_MODEL)],
                     ServerConfig(api_key=API_KEY, ui_db_path=str(root / "chats.db")))
    with BackgroundServer(app) as running:
        yield running


def test_page_asks_for_the_api_key_and_sends_it(browser, keyed_server):
    context, page = _open(browser, keyed_server.url, ready=False)
    seen: list[tuple[str, str | None]] = []
    page.on("request", lambda req: seen.append((req.url, req.headers.get("authorization")))
            if "/v1/" in req.url or "/api/" in req.url else None)

    dialog = page.get_by_test_id("api-key-dialog")
    expect(dialog).to_be_visible()  # the first /v1/models or /api/ call got a 401
    expect(page.get_by_test_id("api-key-error")).to_be_hidden()
    screenshot(page, "chat-api-key-prompt")
    page.get_by_test_id("api-key-input").fill("wrong-key")
    page.get_by_test_id("api-key-save").click()
    # A wrong key: asked again, with the server's reason.
    expect(page.get_by_test_id("api-key-error")).to_contain_text("invalid or missing API key")
    expect(dialog).to_be_visible()
    page.get_by_test_id("api-key-input").fill(API_KEY)
    page.get_by_test_id("api-key-input").press("Enter")
    expect(dialog).to_be_hidden()
    expect(page.locator('[data-testid="app"][data-ready="true"]')).to_be_attached()
    expect(page.get_by_test_id("model-select")).to_have_value(CHAT_MODEL)
    assert page.evaluate("localStorage.getItem('qwenstack.apiKey')") == API_KEY

    send(page, "Hello with a key")
    expect(assistants(page).last.get_by_test_id("message-content")).to_have_text(ANSWER)
    chat_calls = [auth for url, auth in seen if url.endswith("/v1/chat/completions")]
    assert chat_calls and all(auth == f"Bearer {API_KEY}" for auth in chat_calls)
    assert any("/api/conversations" in url and auth == f"Bearer {API_KEY}" for url, auth in seen)

    # Kept in localStorage: a reload asks nothing and finds the conversation.
    seen.clear()
    page.reload()
    expect(page.locator('[data-testid="app"][data-ready="true"]')).to_be_attached()
    expect(dialog).to_be_hidden()
    expect(page.get_by_test_id("conversation-item").filter(has_text="Hello with a key")).to_have_count(1)
    expect(assistants(page).last.get_by_test_id("message-content")).to_have_text(ANSWER)
    api_calls = [(url, auth) for url, auth in seen if "/v1/" in url or "/api/" in url]
    assert api_calls and all(auth == f"Bearer {API_KEY}" for _, auth in api_calls), api_calls
    _close(context, page)


def test_a_refusal_that_arrives_after_the_right_key_does_not_ask_again(browser, keyed_server):
    """The page's first calls go out together; one of them, sent with a wrong key, is answered only after
    the user has saved the right one. It must retry with that key, not reopen the dialog (a slow 401 used to
    ask again, and the page never became ready)."""
    held = []  # the MCP listing sent with the wrong key, answered later by hand

    def hold_wrong_key(route) -> None:
        if route.request.headers.get("authorization") == "Bearer wrong-key":
            held.append(route)
        else:
            route.continue_()

    context, page = _open(browser, keyed_server.url, ready=False, routes={"**/v1/mcp/servers": hold_wrong_key})
    dialog = page.get_by_test_id("api-key-dialog")
    expect(dialog).to_be_visible()
    page.get_by_test_id("api-key-input").fill("wrong-key")
    page.get_by_test_id("api-key-save").click()
    expect(page.get_by_test_id("api-key-error")).to_contain_text("invalid or missing API key")
    for _ in range(200):
        if held:
            break
        page.wait_for_timeout(25)
    assert len(held) == 1, "the MCP listing was not retried with the wrong key"
    page.get_by_test_id("api-key-input").fill(API_KEY)
    page.get_by_test_id("api-key-input").press("Enter")
    expect(dialog).to_be_hidden()
    held[0].fulfill(response=held[0].fetch())  # the wrong key's 401, late
    expect(page.locator('[data-testid="app"][data-ready="true"]')).to_be_attached(timeout=10_000)
    expect(dialog).to_be_hidden()
    expect(page.get_by_test_id("model-select")).to_have_value(CHAT_MODEL)
    _close(context, page)


def test_a_page_opened_while_the_model_loads_lists_it_once_ready(browser, tmp_path):
    """Opened right after `qwenstack serve`, the page said "No model is loaded" for good (the list was asked for
    once); it says the model is loading, and lists it once ready, without a reload."""
    import threading

    from qwenstack.serving.config import ModelSpec

    ready = threading.Event()
    case = build_case(tmp_path / "chat", "think_answer")

    def slow_loader(spec, kv_memory):
        ready.wait(60)
        return tiny_served_model(case.path, CHAT_MODEL)

    config = ServerConfig(api_key=None, ui_db_path=str(tmp_path / "chats.db"), models=[ModelSpec(model=str(case.path))])
    with BackgroundServer(create_app([], config, loader=slow_loader)) as running:
        context, page = _open(browser, running.url)
        try:
            expect(page.get_by_test_id("empty-state")).to_contain_text("The model is loading")
            expect(page.get_by_test_id("model-select")).to_contain_text("loading")
            ready.set()
            expect(page.get_by_test_id("model-select")).to_have_value(CHAT_MODEL, timeout=15_000)
            expect(page.get_by_test_id("empty-state")).to_contain_text(f"Answers come from {CHAT_MODEL}")
            send(page, "Hello there")
            expect(assistants(page).last.get_by_test_id("message-content")).to_have_text(ANSWER)
        finally:
            ready.set()
            _close(context, page)
