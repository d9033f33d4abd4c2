"""The chat page end to end in headless Chromium, against a fake OpenAI-compatible server.

The fake (`make_fake_server`) speaks the same wire format the real server must: /v1/models with
`capabilities`, streamed chat.completion.chunk frames with `reasoning_content` (or `reasoning`) deltas, a
usage chunk, OpenAI error JSON on a 400, `qwenstack_guard` verdicts and tool-call deltas. It records each
request body and each stream whose client went away, so the tests can see what the page sent and that
Stop really ended the request on the server. The page and /api/ come from the real `mount_ui`.

Set QWENSTACK_UPDATE_DOCS_SCREENSHOT=1 to refresh docs/chat-page.png from the light screenshot.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image

from browser import (
    ARTIFACTS, BROWSER_TESTS, REPO, ServerThread, assistants, launch_chromium, page_expect, screenshot, send,
)
from qwenstack.serving.store import ChatStore
from qwenstack.serving.store_api import mount_ui

pytestmark = BROWSER_TESTS

expect = page_expect()


THINK_MODEL = "fake-qwen3-think"
VISION_MODEL = "fake-qwen3-vl"
THINKING = "The user greets me. I should answer briefly, with a code sample and a formula."
ANSWER = ("Hello from **{model}**! Here is some code:\n\n```python\nprint(\"hi\")\n```\n\n"
          "And a formula: $E = mc^2$.")


def _words(text: str) -> list[str]:
    return re.findall(r"\S+\s*|\s+", text)


def _prompt_text(body: dict) -> str:
    for message in reversed(body.get("messages", [])):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                return " ".join(p.get("text", "") for p in content if p.get("type") == "text")
            return content or ""
    return ""


def make_fake_server(store: ChatStore, extra_models: tuple[dict, ...] = ()) -> FastAPI:
    """extra_models: more entries of GET /v1/models (a speech model, say)."""
    app = FastAPI()
    app.state.requests = []
    app.state.disconnects = []
    models = [
        {"id": THINK_MODEL, "object": "model", "owned_by": "test", "capabilities": ["text"]},
        {"id": VISION_MODEL, "object": "model", "owned_by": "test", "capabilities": ["text", "vision"]},
        *extra_models,
    ]

    @app.get("/v1/models")
    def list_models() -> dict:
        return {"object": "list", "data": models}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        app.state.requests.append(body)
        prompt = _prompt_text(body)
        model = body.get("model")
        if "TOO LONG" in prompt:
            return JSONResponse(status_code=400, content={"error": {
                "message": "This model's maximum context length is 64 tokens; the messages have 5000 tokens.",
                "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}})
        thinking = (body.get("chat_template_kwargs") or {}).get("enable_thinking", True)
        # The vision fake uses vLLM's newer field name, so the page's fallback is exercised too.
        reasoning_field = "reasoning" if model == VISION_MODEL else "reasoning_content"

        def chunk(delta: dict | None = None, finish: str | None = None, **extra) -> str:
            obj = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time()),
                   "model": model, "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}], **extra}
            return f"data: {json.dumps(obj)}\n\n"

        async def events():
            completed = False
            tokens = 0
            try:
                yield chunk({"role": "assistant", "content": ""})
                if thinking:
                    for word in _words(THINKING):
                        tokens += 1
                        yield chunk({reasoning_field: word})
                        await asyncio.sleep(0.06)
                if "GUARD" in prompt:
                    yield chunk({}, "content_filter", qwenstack_guard={
                        "direction": "answer", "safety": "Unsafe", "categories": ["Violent", "Jailbreak"],
                        "action": "block"})
                elif "STREAM ERROR" in prompt:
                    yield chunk({"content": "Partial answer"})
                    err = {"error": {"message": "the engine ran out of KV cache blocks", "type": "server_error",
                                     "param": None, "code": None}}
                    yield f"data: {json.dumps(err)}\n\n"
                    yield "data: [DONE]\n\n"
                    completed = True
                    return
                elif body["messages"][-1]["role"] == "tool":
                    yield chunk({"content": f"The tool answered {body['messages'][-1]['content']}."})
                    yield chunk({}, "stop")
                elif "TOOL" in prompt:
                    yield chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                                 "function": {"name": "get_weather", "arguments": ""}}]})
                    for piece in ['{"city": ', '"Paris"}']:
                        yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
                        await asyncio.sleep(0.03)
                    yield chunk({}, "tool_calls")
                else:
                    text = ANSWER.format(model=model)
                    if "LONG ANSWER" in prompt:
                        text = "This answer goes on and on. " * 400
                    for i, word in enumerate(_words(text)):
                        tokens += 1
                        yield chunk({"content": word})
                        # A pause after the answer's first two words: a test that checks the answer while it
                        # still streams polls at up to 1 s intervals, and on a loaded 2-core runner the rest
                        # of this ~0.5 s answer could end the stream between two polls.
                        await asyncio.sleep(0.5 if i == 1 else 0.03)
                    yield chunk({}, "stop")
                usage = {"prompt_tokens": 12, "completion_tokens": tokens, "total_tokens": 12 + tokens}
                yield f"data: {json.dumps({'id': 'chatcmpl-fake', 'object': 'chat.completion.chunk', 'model': model, 'choices': [], 'usage': usage})}\n\n"  # noqa: E501
                yield "data: [DONE]\n\n"
                completed = True
            finally:
                if not completed:
                    app.state.disconnects.append(prompt)

        return StreamingResponse(events(), media_type="text/event-stream")

    mount_ui(app, store)
    return app


# -------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    store = ChatStore(tmp_path_factory.mktemp("ui") / "chats.db")
    app = make_fake_server(store)
    with ServerThread(app) as running:
        running.app = app
        running.store = store
        yield running
    store.close()


@pytest.fixture(scope="module")
def browser():
    with launch_chromium() as b:
        yield b


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 820}, color_scheme="light")
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
    page = context.new_page()
    errors: list[str] = []
    outside: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("request", lambda req: None if req.url.startswith((server.url, "data:", "blob:")) else outside.append(req.url))
    page.goto(server.url + "/")
    expect(page.locator('[data-testid="app"][data-ready="true"]')).to_be_attached(timeout=15_000)
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"
    assert not outside, f"the page asked for something outside qwenstack: {outside}"


def new_chat(page) -> None:
    page.get_by_test_id("new-chat").click()
    expect(page.get_by_test_id("empty-state")).to_be_visible()


# -------------------------------------------------------------------------------------------- tests

def test_message_streams_with_thinking_that_folds(page, server):
    page.get_by_test_id("model-select").select_option(THINK_MODEL)
    box = page.get_by_test_id("composer-input")
    box.fill("first line")
    box.press("Shift+Enter")
    box.type("second line")
    assert box.input_value() == "first line\nsecond line"  # Shift+Enter is a newline, not a send
    box.fill("Hello there")
    box.press("Enter")

    live = page.locator('[data-role="assistant"][data-streaming="true"]')
    thinking = live.get_by_test_id("thinking")
    # While the model thinks, the section is open and its text grows.
    expect(thinking).to_have_attribute("open", "", timeout=10_000)
    expect(thinking.get_by_test_id("thinking-content")).to_contain_text("The user greets me")
    expect(live.get_by_test_id("thinking-toggle")).to_have_text(re.compile(r"Thinking… \d+\.\d s"))
    # Answer text appears while the stream is still going, and the thinking section folds.
    expect(live.get_by_test_id("message-content")).to_contain_text("Hello from", timeout=10_000)
    expect(live.get_by_test_id("thinking")).not_to_have_attribute("open", "")

    answer = assistants(page).last
    expect(answer).to_have_attribute("data-streaming", "false", timeout=15_000)
    expect(answer.get_by_test_id("message-content")).to_contain_text(f"Hello from {THINK_MODEL}!")
    expect(answer.locator("strong")).to_have_text(THINK_MODEL)
    answer.get_by_test_id("copy-code").click()
    expect(answer.get_by_test_id("copy-code")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == 'print("hi")\n'
    expect(answer.locator(".code-block pre")).to_contain_text('print("hi")')
    expect(answer.locator(".katex")).to_have_count(1)
    expect(answer.get_by_test_id("message-metrics")).to_contain_text(re.compile(r"TTFT \d+\.\d\d s · [\d.]+ tok/s · \d+ tokens"))

    # Expand and collapse the finished thinking section.
    toggle = answer.get_by_test_id("thinking-toggle")
    expect(toggle).to_have_text(re.compile(r"Thought for \d+\.\d s"))
    section = answer.get_by_test_id("thinking")
    expect(section).not_to_have_attribute("open", "")
    toggle.click()
    expect(section).to_have_attribute("open", "")
    expect(section.get_by_test_id("thinking-content")).to_be_visible()
    toggle.click()
    expect(section).not_to_have_attribute("open", "")

    body = server.app.state.requests[-1]
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["chat_template_kwargs"] == {"enable_thinking": True}
    assert body["model"] == THINK_MODEL
    assert body["messages"][-1] == {"role": "user", "content": "Hello there"}

    # Stored server-side with its reasoning and metrics.
    cid = re.search(r"#c=(\w+)", page.url).group(1)
    stored = server.store.get_conversation(cid)["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant"]
    assert stored[1]["reasoning"].startswith("The user greets me")
    assert stored[1]["metrics"]["completion_tokens"] > 0 and stored[1]["metrics"]["ttft_s"] >= 0


SSE_CASES = r"""
async () => {
  const { readSSE, AnswerAccumulator } = await import("./ui/sse.js");
  const enc = new TextEncoder();
  const stream = (pieces) => new ReadableStream({
    start(c) { for (const p of pieces) c.enqueue(enc.encode(p)); c.close(); } });
  const frames = [];
  // CRLF line ends split between reads, a comment ping, a multi-line data field, and [DONE] ending the read.
  await readSSE(stream([": ping\r\n\r\ndata: {\"a\":", "1}\r", "\n\r\ndata: {\"b\":\ndata: 2}\n\n",
                        "data: [DONE]\n\ndata: {\"after\": 1}\n\n"]), (o) => frames.push(o));
  const acc = new AnswerAccumulator(0);
  const chunks = [
    {choices: [{index: 0, delta: {role: "assistant", content: ""}}]},
    {choices: [{index: 0, delta: {reasoning: "hmm "}}]},
    {choices: [{index: 0, delta: {reasoning_content: "ok"}}]},
    {choices: [{index: 0, delta: {content: "Hi"}}]},
    {choices: [{index: 0, delta: {tool_calls: [{index: 0, id: "c1", type: "function",
                                                function: {name: "f", arguments: "{\"x\""}}]}}]},
    {choices: [{index: 0, delta: {tool_calls: [{index: 0, function: {arguments: ": 1}"}}]}}]},
    {choices: [{index: 1, delta: {content: "other choice, ignored"}}]},
    {choices: [{index: 0, delta: {}, finish_reason: "tool_calls"}]},
    {choices: [], usage: {prompt_tokens: 3, completion_tokens: 5}},
  ];
  chunks.forEach((c, i) => acc.apply(c, 1000 + 100 * i));
  return {frames, content: acc.content, reasoning: acc.reasoning, tools: acc.toolCalls,
          finish: acc.finishReason, metrics: acc.metrics(2000)};
}
"""


def test_stream_parsing_in_the_browser(page):
    out = page.evaluate(SSE_CASES)
    assert out["frames"] == [{"a": 1}, {"b": 2}]
    assert (out["content"], out["reasoning"], out["finish"]) == ("Hi", "hmm ok", "tool_calls")
    assert out["tools"] == [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]
    # First token at 1100 ms after a start at 0; the 4 tokens after it arrive by the last delta, at 1500 ms.
    assert out["metrics"] == {"ttft_s": 1.1, "elapsed_s": 2.0, "completion_tokens": 5, "prompt_tokens": 3,
                              "tokens_per_s": 10.0}


def test_stop_aborts_the_request_on_the_server(page, server):
    new_chat(page)
    before = len(server.app.state.disconnects)
    send(page, "Write a LONG ANSWER please", wait=False)
    live = page.locator('[data-role="assistant"][data-streaming="true"]')
    expect(live.get_by_test_id("message-content")).to_contain_text("goes on", timeout=10_000)
    expect(page.get_by_test_id("stop-button")).to_be_visible()
    page.get_by_test_id("stop-button").click()

    answer = assistants(page).last
    expect(answer).to_have_attribute("data-finish", "abort", timeout=10_000)
    expect(answer.get_by_test_id("message-stopped")).to_be_visible()
    expect(page.get_by_test_id("send-button")).to_be_visible()
    deadline = time.monotonic() + 10
    while len(server.app.state.disconnects) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.app.state.disconnects[before:] == ["Write a LONG ANSWER please"]

    # Escape stops too.
    send(page, "Another LONG ANSWER", wait=False)
    expect(page.locator('[data-role="assistant"][data-streaming="true"]').get_by_test_id("message-content")
           ).to_contain_text("goes on", timeout=10_000)
    page.keyboard.press("Escape")
    expect(assistants(page).last).to_have_attribute("data-finish", "abort", timeout=10_000)
    deadline = time.monotonic() + 10
    while len(server.app.state.disconnects) < before + 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.app.state.disconnects[before + 1:] == ["Another LONG ANSWER"]


def test_reload_search_rename_delete(page, server):
    new_chat(page)
    send(page, "Remember the word PLUMTREE")
    page.reload()
    expect(page.locator('[data-testid="app"][data-ready="true"]')).to_be_attached()
    # The URL names the conversation, so a reload reopens it with its messages.
    expect(page.get_by_test_id("chat-title")).to_have_text("Remember the word PLUMTREE")
    expect(page.locator('[data-role="user"]').get_by_test_id("message-content")).to_have_text("Remember the word PLUMTREE")
    expect(assistants(page)).to_have_count(1)

    # A fresh visit without the URL finds it in the sidebar.
    page.goto(server.url + "/")
    item = page.get_by_test_id("conversation-item").filter(has_text="PLUMTREE")
    expect(item).to_have_count(1)
    item.get_by_test_id("conversation-title").click()
    expect(assistants(page)).to_have_count(1)

    search = page.get_by_test_id("search-input")
    search.fill("plumtree")
    expect(page.get_by_test_id("conversation-item")).to_have_count(1)
    search.fill("no-such-text-anywhere")
    expect(page.get_by_test_id("conversation-item")).to_have_count(0)
    expect(page.get_by_test_id("conversation-empty")).to_be_visible()
    search.fill("")

    item = page.get_by_test_id("conversation-item").filter(has_text="PLUMTREE")
    item.hover()
    item.get_by_test_id("rename-conversation").click()
    rename = page.get_by_test_id("rename-input")
    rename.fill("Fruit trees")
    rename.press("Enter")
    expect(page.get_by_test_id("conversation-item").filter(has_text="Fruit trees")).to_have_count(1)
    expect(page.get_by_test_id("chat-title")).to_have_text("Fruit trees")
    page.reload()
    # Ready first: opening the conversation of the URL re-renders the list (to mark it active), which would
    # drop a delete confirmation shown before it.
    expect(page.locator('[data-testid="app"][data-ready="true"]')).to_be_attached()
    item = page.get_by_test_id("conversation-item").filter(has_text="Fruit trees")
    expect(item).to_have_count(1)
    cid = item.get_attribute("data-id")
    assert server.store.get_conversation(cid, with_messages=False)["title"] == "Fruit trees"

    item.hover()
    item.get_by_test_id("delete-conversation").click()
    item.get_by_test_id("confirm-delete").click()
    expect(page.get_by_test_id("conversation-item").filter(has_text="Fruit trees")).to_have_count(0)
    expect(page.get_by_test_id("empty-state")).to_be_visible()
    page.reload()
    expect(page.locator('[data-testid="app"][data-ready="true"]')).to_be_attached()
    expect(page.get_by_test_id("conversation-item").filter(has_text="Fruit trees")).to_have_count(0)
    assert all(c["id"] != cid for c in server.store.list_conversations())


def test_switch_models_and_attachment_capability(page, server, tmp_path):
    new_chat(page)
    picker = page.get_by_test_id("model-select")
    expect(picker.locator("option")).to_have_count(2)
    picker.select_option(THINK_MODEL)
    attach = page.get_by_test_id("attach-button")
    expect(attach).to_be_disabled()
    expect(attach).to_have_attribute("title", re.compile("does not accept images"))
    picker.select_option(VISION_MODEL)
    expect(attach).to_be_enabled()

    send(page, "Who are you?")
    answer = assistants(page).last
    expect(answer.get_by_test_id("message-content")).to_contain_text(f"Hello from {VISION_MODEL}!")
    # The vision fake streams `reasoning` rather than `reasoning_content`; the page reads both.
    expect(answer.get_by_test_id("thinking-content")).to_contain_text("The user greets me")
    assert server.app.state.requests[-1]["model"] == VISION_MODEL

    # Attach an image: it goes out as an image_url part.
    png = tmp_path / "dot.png"
    Image.new("RGB", (24, 24), (91, 78, 230)).save(png)
    page.get_by_test_id("attach-input").set_input_files(str(png))
    expect(page.get_by_test_id("attachment-preview")).to_have_count(1)
    send(page, "What is in this picture?")
    parts = server.app.state.requests[-1]["messages"][-1]["content"]
    assert parts[0] == {"type": "text", "text": "What is in this picture?"}
    assert parts[1]["type"] == "image_url" and parts[1]["image_url"]["url"].startswith("data:image/png;base64,")
    expect(page.locator('[data-role="user"]').last.get_by_test_id("message-attachment")).to_be_visible()

    picker.select_option(THINK_MODEL)
    expect(attach).to_be_disabled()
    send(page, "And now?")
    assert server.app.state.requests[-1]["model"] == THINK_MODEL
    expect(assistants(page).last.get_by_test_id("message-content")).to_contain_text(f"Hello from {THINK_MODEL}!")
    cid = re.search(r"#c=(\w+)", page.url).group(1)
    assert server.store.get_conversation(cid, with_messages=False)["model"] == THINK_MODEL


def test_server_error_is_shown_readably(page, server):
    new_chat(page)
    send(page, "This prompt is TOO LONG for the model")
    error = assistants(page).last.get_by_test_id("message-error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("maximum context length is 64 tokens")
    # The failed turn is not resent with the next message.
    send(page, "Short one")
    sent = [m["content"] for m in server.app.state.requests[-1]["messages"] if m["role"] == "user"]
    assert sent == ["Short one"]
    expect(assistants(page).last.get_by_test_id("message-error")).to_have_count(0)

    # An error frame in the middle of a stream (HTTP 200 already sent) keeps the partial text and says why.
    send(page, "Cause a STREAM ERROR")
    answer = assistants(page).last
    expect(answer.get_by_test_id("message-content")).to_have_text("Partial answer")
    expect(answer.get_by_test_id("message-error")).to_contain_text("ran out of KV cache blocks")
    screenshot(page, "chat-errors")


def test_thinking_switch_and_settings_are_sent(page, server):
    new_chat(page)
    page.get_by_test_id("model-select").select_option(THINK_MODEL)
    page.get_by_test_id("settings-button").click()
    panel = page.get_by_test_id("settings-panel")
    expect(panel).to_be_visible()
    panel.get_by_test_id("settings-system-prompt").fill("You are terse.")
    panel.get_by_test_id("settings-temperature").fill("0.3")
    panel.get_by_test_id("settings-top-p").fill("0.9")
    panel.get_by_test_id("settings-max-tokens").fill("64")
    panel.get_by_test_id("settings-thinking-budget").fill("128")
    panel.get_by_test_id("settings-save").click()
    expect(panel).to_be_hidden()
    send(page, "Settings check")
    body = server.app.state.requests[-1]
    assert body["messages"][0] == {"role": "system", "content": "You are terse."}
    assert (body["temperature"], body["top_p"], body["max_tokens"], body["thinking_budget"]) == (0.3, 0.9, 64, 128)

    # Out-of-range values are refused by /api/ and the message is shown in the dialog.
    page.get_by_test_id("settings-button").click()
    panel.get_by_test_id("settings-temperature").fill("5")
    panel.get_by_test_id("settings-save").click()
    expect(panel.get_by_test_id("settings-error")).to_contain_text("temperature")
    panel.get_by_test_id("settings-close").click()

    page.get_by_test_id("thinking-switch").uncheck(force=True)
    send(page, "No thinking please")
    body = server.app.state.requests[-1]
    assert body["chat_template_kwargs"] == {"enable_thinking": False}
    assert "thinking_budget" not in body
    expect(assistants(page).last.get_by_test_id("thinking")).to_be_hidden()
    page.reload()
    expect(page.get_by_test_id("thinking-switch")).not_to_be_checked()  # kept per conversation
    expect(page.locator('[data-testid="app"][data-ready="true"]')).to_be_attached()
    page.get_by_test_id("settings-button").click()
    expect(panel.get_by_test_id("settings-temperature")).to_have_value("0.3")


def test_thinking_switch_applies_before_the_server_has_saved_it(page, server):
    """A message sent straight after the switch must use it, even while its save is still on the way."""
    new_chat(page)
    send(page, "First turn")
    held = []
    page.route("**/api/conversations/*/settings", lambda route: held.append(route))
    page.get_by_test_id("thinking-switch").uncheck(force=True)
    _wait_for(page, lambda: held)
    send(page, "No thinking, sent at once")
    assert server.app.state.requests[-1]["chat_template_kwargs"] == {"enable_thinking": False}
    held.pop().continue_()

    # A save the server refuses puts the switch back and says so.
    page.unroute("**/api/conversations/*/settings")
    page.route("**/api/conversations/*/settings", lambda route: route.abort())
    page.get_by_test_id("thinking-switch").check(force=True)
    expect(page.get_by_test_id("banner")).to_contain_text("Could not save the thinking switch")
    expect(page.get_by_test_id("thinking-switch")).not_to_be_checked()
    send(page, "Still without thinking")
    assert server.app.state.requests[-1]["chat_template_kwargs"] == {"enable_thinking": False}


def _wait_for(page, condition, timeout: float = 5.0) -> None:
    # Playwright's sync API runs route handlers only inside its own calls, so the wait is one of them.
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the page never sent the request"
        page.wait_for_timeout(20)


def test_regenerate_and_edit_and_resend(page, server):
    new_chat(page)
    send(page, "Tell me something")
    n = len(server.app.state.requests)

    def replaced(old_id: str):
        """The saved answer that took the place of `old_id`."""
        return page.locator(f'[data-role="assistant"][data-streaming="false"]:not([data-id="{old_id}"])')

    first = assistants(page).last.get_attribute("data-id")
    assistants(page).last.get_by_test_id("regenerate-button").click()
    expect(replaced(first)).to_have_count(1, timeout=15_000)
    expect(assistants(page)).to_have_count(1)
    assert len(server.app.state.requests) == n + 1
    assert server.app.state.requests[-1]["messages"] == [{"role": "user", "content": "Tell me something"}]

    second = assistants(page).last.get_attribute("data-id")
    page.locator('[data-role="user"]').last.get_by_test_id("edit-button").click()
    box = page.get_by_test_id("edit-input")
    box.fill("Tell me something else")
    page.get_by_test_id("edit-save").click()
    expect(replaced(second)).to_have_count(1, timeout=15_000)
    expect(assistants(page)).to_have_count(1)
    expect(page.locator('[data-role="user"]').last.get_by_test_id("message-content")).to_have_text(
        "Tell me something else")
    assert server.app.state.requests[-1]["messages"] == [{"role": "user", "content": "Tell me something else"}]
    cid = re.search(r"#c=(\w+)", page.url).group(1)
    stored = server.store.get_conversation(cid)["messages"]
    assert [(m["role"], m["content"][:22]) for m in stored][:1] == [("user", "Tell me something else")]
    assert len(stored) == 2


def test_guard_verdict_and_tool_call_cards(page, server):
    new_chat(page)
    send(page, "Something for the GUARD")
    verdict = assistants(page).last.get_by_test_id("guard-verdict")
    expect(verdict).to_be_visible()
    expect(verdict).to_contain_text("Blocked by the safety guard")
    expect(verdict).to_contain_text("Unsafe")
    expect(verdict.get_by_test_id("guard-categories")).to_contain_text("Violent")
    expect(verdict.get_by_test_id("guard-categories")).to_contain_text("Jailbreak")

    send(page, "Use a TOOL")
    card = assistants(page).last.get_by_test_id("tool-call")
    expect(card).to_contain_text("get_weather")
    expect(card).to_contain_text('"city": "Paris"')
    card.get_by_test_id("tool-result-input").fill('{"temp_c": 21}')
    card.get_by_test_id("tool-result-submit").click()
    expect(page.get_by_test_id("tool-result")).to_contain_text('{"temp_c": 21}')
    expect(page.locator('[data-role="assistant"][data-streaming="false"]')).to_have_count(3, timeout=15_000)
    sent = server.app.state.requests[-1]["messages"]
    assert sent[-2]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert sent[-1] == {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'}
    expect(assistants(page).last.get_by_test_id("message-content")).to_have_text('The tool answered {"temp_c": 21}.')
    screenshot(page, "chat-guard-and-tools")


@pytest.fixture
def showcase(tmp_path):
    """A server of its own, so the screenshots show a tidy sidebar rather than the other tests' chats."""
    store = ChatStore(tmp_path / "chats.db")
    for title, question, answer in [
        ("Plan a weekend in Lisbon", "Plan a weekend in Lisbon", "Day 1: Alfama and the castle; day 2: Belém."),
        ("Explain paged attention", "Explain paged attention", "The KV cache is split into fixed-size blocks."),
    ]:
        cid = store.create_conversation(title, THINK_MODEL)["id"]
        store.append_messages(cid, [{"role": "user", "content": question},
                                    {"role": "assistant", "content": answer, "model": THINK_MODEL}])
    with ServerThread(make_fake_server(store)) as running:
        yield running
    store.close()


@pytest.mark.slow  # writes the README screenshots; its dark-scheme and phone-width checks run only under -m slow
def test_screenshots_in_light_and_dark_and_on_a_phone(browser, showcase):
    server = showcase
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shots = {}
    for scheme in ("light", "dark"):
        context = browser.new_context(viewport={"width": 1280, "height": 820}, color_scheme=scheme)
        page = context.new_page()
        page.goto(server.url + "/")
        expect(page.locator('[data-testid="app"][data-ready="true"]')).to_be_attached()
        if scheme == "light":
            page.get_by_test_id("model-select").select_option(THINK_MODEL)
            send(page, "Hello! Show me a code sample and a formula.")
            assistants(page).last.get_by_test_id("thinking-toggle").click()  # show the thinking too
            cid = re.search(r"#c=(\w+)", page.url).group(1)
        else:
            page.goto(f"{server.url}/#c={cid}")
            page.reload()
            expect(assistants(page)).to_have_count(1)
        bg = page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert (bg == "rgb(255, 255, 255)") == (scheme == "light"), bg
        shots[scheme] = screenshot(page, f"chat-{scheme}")
        context.close()

    # The toggle overrides the system preference: light system, dark page.
    context = browser.new_context(viewport={"width": 1280, "height": 820}, color_scheme="light")
    page = context.new_page()
    page.goto(f"{server.url}/#c={cid}")
    expect(page.locator('[data-testid="app"][data-ready="true"]')).to_be_attached()
    toggle = page.get_by_test_id("theme-toggle")
    toggle.click()
    expect(toggle).to_have_text("Theme: light")
    toggle.click()
    expect(toggle).to_have_text("Theme: dark")
    assert page.evaluate("getComputedStyle(document.body).backgroundColor") != "rgb(255, 255, 255)"
    screenshot(page, "chat-dark-toggle")
    page.reload()
    expect(page.locator("html")).to_have_attribute("data-theme", "dark")  # remembered
    toggle.click()
    expect(toggle).to_have_text("Theme: system")
    context.close()

    # A phone: the sidebar hides behind a button and the composer stays usable.
    context = browser.new_context(viewport={"width": 390, "height": 844}, color_scheme="light", is_mobile=True,
                                  has_touch=True, device_scale_factor=2)
    page = context.new_page()
    page.goto(f"{server.url}/#c={cid}")
    expect(page.locator('[data-testid="app"][data-ready="true"]')).to_be_attached()
    expect(page.get_by_test_id("sidebar")).not_to_be_in_viewport()
    expect(page.get_by_test_id("composer-input")).to_be_in_viewport()
    expect(page.get_by_test_id("send-button")).to_be_in_viewport()
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the page scrolls sideways on a phone ({width}px)"
    screenshot(page, "chat-phone")
    page.get_by_test_id("sidebar-toggle").click()
    expect(page.get_by_test_id("sidebar")).to_be_in_viewport(ratio=1)  # slid fully in
    screenshot(page, "chat-phone-sidebar")
    page.get_by_test_id("scrim").click(position={"x": 370, "y": 400})
    expect(page.get_by_test_id("sidebar")).not_to_be_in_viewport()
    context.close()

    assert shots["light"].stat().st_size > 10_000 and shots["dark"].stat().st_size > 10_000
    if os.environ.get("QWENSTACK_UPDATE_DOCS_SCREENSHOT") == "1":
        (REPO / "docs").mkdir(exist_ok=True)
        shutil.copyfile(shots["light"], REPO / "docs" / "chat-page.png")
