"""Headless Chromium for the page tests: Debian's /usr/bin/chromium driven by Playwright for Python.

Playwright's own browser downloads are never used (`playwright install` needs the internet); the system
Chromium is launched by path. Screenshots go to artifacts/ at the repository root (QWENSTACK_ARTIFACTS
overrides), which git ignores.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]
REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("QWENSTACK_ARTIFACTS", REPO / "artifacts"))


def chromium_available() -> bool:
    return CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)


# A page test module's `pytestmark`: skipped only where scripts/test.sh could not install Chromium (not root).
BROWSER_TESTS = [
    pytest.mark.browser,
    pytest.mark.skipif(not chromium_available(), reason="Debian's Chromium is not installed at /usr/bin/chromium "
                       "(apt-get install chromium)"),
]


def page_expect() -> Any:
    """Playwright's `expect`, waiting up to 30 s: two shared cores run the model beside the browser. (Its
    timeout is process-wide, so it is set here once for every page test.)"""
    from playwright.sync_api import expect

    expect.set_options(timeout=30_000)
    return expect


@contextmanager
def launch_chromium() -> Iterator["object"]:
    """Yields a Playwright Browser running Debian's Chromium headless."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def assistants(page: Any) -> Any:
    return page.locator('[data-testid="message"][data-role="assistant"]')


def send(page: Any, text: str, *, wait: bool = True, timeout: float = 30_000) -> None:
    """Types a message and presses Enter; with wait, returns once the answer is finished and saved."""
    expect = page_expect()
    done_before = page.locator('[data-role="assistant"][data-streaming="false"]').count()
    box = page.get_by_test_id("composer-input")
    box.fill(text)
    box.press("Enter")
    if wait:
        expect(page.locator('[data-role="assistant"][data-streaming="false"]')).to_have_count(
            done_before + 1, timeout=timeout)
        expect(page.locator('[data-testid="app"][data-streaming="false"]')).to_be_attached()


def screenshot(page: "object", name: str, full_page: bool = False) -> Path:
    """Saves artifacts/<name>.png and returns its path."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    return path


class ServerThread:
    """Serves an ASGI app with uvicorn on 127.0.0.1 and a free port, in a daemon thread."""

    def __init__(self, app: "object"):
        import uvicorn

        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))  # bound here, so no other process can take the port before uvicorn
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def __enter__(self) -> "ServerThread":
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()


def microphone_page(playwright: Any, origin: str, wav: Path) -> tuple[Any, Any, list[str]]:
    """Chromium whose microphone plays `wav` once (fake capture, permission granted for `origin`) and may play
    audio without a gesture: (browser, page, the page's JavaScript errors as they happen)."""
    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS + [
        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}%noloop", "--autoplay-policy=no-user-gesture-required"])
    context = browser.new_context()
    context.grant_permissions(["microphone"], origin=origin)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    return browser, page, errors
