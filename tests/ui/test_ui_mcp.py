"""The chat page with MCP tools, in headless Chromium against the real server: a conversation enables a
registered MCP server in its settings, the answer then comes from /v1/responses (the server runs the tools), and
the page shows each call and its result as cards, saved with the conversation."""
from __future__ import annotations

from typing import Iterator

import pytest

from browser import BROWSER_TESTS, launch_chromium, page_expect, screenshot
from responses_fixtures import AGENT_ANSWER, build_agent, mcp_test_app
from server_utils import BackgroundServer, tiny_served_model
from qwenstack.serving.app import create_app
from qwenstack.serving.config import ServerConfig

pytestmark = BROWSER_TESTS

expect = page_expect()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    root = tmp_path_factory.mktemp("ui-mcp")
    agent = build_agent(root / "agent")
    with BackgroundServer(mcp_test_app()) as mcp_server:
        config = ServerConfig(ui_db_path=str(root / "chats.db"), mcp_servers={"station": mcp_server.url + "/mcp"},
                              mcp_timeout_s=10)
        with BackgroundServer(create_app([tiny_served_model(agent.path, "agent")], config)) as running:
            yield running


def test_enabled_mcp_server_runs_tools_shown_as_cards(server: BackgroundServer) -> None:
    with launch_chromium() as browser:
        context = browser.new_context(viewport={"width": 1280, "height": 900}, color_scheme="light")
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(server.url + "/")
        expect(page.locator('[data-testid="app"][data-ready="true"]')).to_be_attached()

        page.get_by_test_id("settings-button").click()
        choice = page.get_by_test_id("settings-mcp-server")
        expect(choice).to_have_count(1)
        expect(choice).to_have_value("station")
        choice.check()
        page.get_by_test_id("settings-save").click()

        box = page.get_by_test_id("composer-input")
        box.fill("Weather and time in Paris?")
        box.press("Enter")
        answer = page.locator('[data-role="assistant"][data-streaming="false"]').last
        expect(answer.get_by_test_id("message-content")).to_have_text(AGENT_ANSWER)
        calls = page.get_by_test_id("tool-call")
        expect(calls).to_have_count(2)
        expect(calls.first).to_contain_text("get_weather")
        expect(calls.last).to_contain_text("get_time")
        results = page.get_by_test_id("tool-result")
        expect(results).to_have_count(2)
        expect(results.first).to_contain_text("Paris: sunny, 21 C")
        expect(results.last).to_contain_text("Error:")  # the failing tool's error, as the model read it
        expect(page.get_by_test_id("tool-result-input")).to_have_count(0)  # the server ran them: nothing to answer
        screenshot(page, "chat-mcp-tools")

        page.reload()  # saved with the conversation, settings included
        expect(page.get_by_test_id("tool-call")).to_have_count(2)
        expect(page.get_by_test_id("tool-result")).to_have_count(2)
        page.get_by_test_id("settings-button").click()
        expect(page.get_by_test_id("settings-mcp-server")).to_be_checked()
        context.close()
        assert not errors, f"JavaScript errors on the page: {errors}"
