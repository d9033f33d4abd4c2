"""The chat page is served whole by qwenstack: every asset the page names is ours, local, and served."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from urllib.parse import urljoin, urlparse

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from qwenstack.serving.store import ChatStore
from qwenstack.serving.store_api import UI_DIR, mount_ui

OWN_FILES = ["index.html", "app.js", "views.js", "request.js", "sse.js", "markdown.js", "theme.js", "style.css"]
VENDOR = UI_DIR / "vendor"
# URLs that vendored code contains as data, never fetches: XML namespaces, project links in messages/comments.
VENDOR_URL_HOSTS = {"www.w3.org", "github.com", ""}


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.inline_scripts = 0
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for name in ("src", "href"):
            if attrs.get(name):
                self.refs.append(attrs[name])
        self._in_script = tag == "script" and not attrs.get("src")

    def handle_data(self, data):
        if self._in_script and data.strip():
            self.inline_scripts += 1

    def handle_endtag(self, tag):
        self._in_script = False


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> TestClient:
    app = FastAPI()
    mount_ui(app, ChatStore(tmp_path_factory.mktemp("ui") / "chats.db"))
    return TestClient(app)


def _crawl(client: TestClient) -> dict[str, str]:
    """Fetches the page and, transitively, every script, module import, stylesheet and CSS url(); returns
    {url path: content type}."""
    seen: dict[str, str] = {}
    todo = ["/"]
    while todo:
        url = todo.pop()
        if url in seen:
            continue
        r = client.get(url)
        assert r.status_code == 200, f"{url} -> {r.status_code}"
        assert r.content, f"{url} is empty"
        seen[url] = r.headers["content-type"]
        path = urlparse(url).path
        found: list[str] = []
        if path == "/":
            parser = _Refs()
            parser.feed(r.text)
            assert parser.inline_scripts == 0, "inline scripts would need a CSP exception"
            found = parser.refs
        elif path.endswith(".js") and "/vendor/" not in path:
            found = re.findall(r"""^\s*import\s[^"']*["']([^"']+)["']""", r.text, re.M)
        elif path.endswith(".css"):
            found = re.findall(r"""url\(\s*["']?([^"')]+)["']?\s*\)""", r.text)
        for ref in found:
            if ref.startswith("data:"):
                continue
            parsed = urlparse(ref)
            assert not parsed.scheme and not parsed.netloc, f"{url} refers outside the server: {ref}"
            todo.append(urljoin(url, ref).split("#")[0].split("?")[0])
    return seen


def test_the_page_and_every_asset_it_names_are_served(client):
    served = _crawl(client)
    assert served["/"].startswith("text/html")
    expected = {f"/ui/{name}" for name in OWN_FILES if name != "index.html"} | {
        "/ui/vendor/marked/marked.umd.js", "/ui/vendor/dompurify/purify.min.js", "/ui/vendor/katex/katex.min.js",
        "/ui/vendor/katex/katex.min.css", "/ui/vendor/katex/fonts/KaTeX_Main-Regular.woff2"}
    assert expected <= set(served), expected - set(served)
    for url, content_type in served.items():
        if url.endswith(".js"):  # module scripts are refused without a JavaScript MIME type
            assert "javascript" in content_type, (url, content_type)
        if url.endswith(".woff2"):
            assert content_type == "font/woff2"
    fonts = [u for u in served if u.endswith(".woff2")]
    assert len(fonts) == len(list((VENDOR / "katex" / "fonts").glob("*.woff2"))) == 20


def test_page_has_the_elements_tests_drive(client):
    html = client.get("/").text
    for testid in ["model-select", "composer-input", "send-button", "stop-button", "attach-button", "thinking-switch",
                   "settings-button", "settings-panel", "new-chat", "search-input", "conversation-list",
                   "theme-toggle", "sidebar-toggle", "messages", "banner"]:
        assert f'data-testid="{testid}"' in html, testid


@pytest.mark.parametrize("name", OWN_FILES)
def test_our_files_name_no_external_url(name):
    text = (UI_DIR / name).read_text(encoding="utf-8")
    assert not re.search(r"https?://|(?<![\w:])//[\w.-]+\.\w+/", text), f"{name} names an external URL"


def test_vendored_code_fetches_nothing_external():
    for path in VENDOR.rglob("*"):
        if path.suffix not in {".js", ".css"}:
            continue
        text = path.read_text(encoding="utf-8")
        assert "sourceMappingURL" not in text, f"{path.name}: the browser would ask for a source map we do not ship"
        assert "@import" not in text, path.name
        hosts = {urlparse(u).netloc for u in re.findall(r"https?://[\w./-]*", text)}
        assert hosts <= VENDOR_URL_HOSTS, f"{path.name} names {hosts - VENDOR_URL_HOSTS}"


def test_vendored_libraries_are_small_and_licensed():
    total = sum(p.stat().st_size for p in VENDOR.rglob("*") if p.is_file())
    assert total < 2 * 1024 * 1024, f"vendor/ is {total / 1e6:.1f} MB"
    for lib in ("marked", "dompurify", "katex"):
        assert (VENDOR / lib / "LICENSE").is_file(), lib


def test_unknown_ui_paths_are_404_and_the_api_is_mounted(client):
    assert client.get("/ui/nope.js").status_code == 404
    assert client.get("/ui/../store.py").status_code == 404
    assert client.get("/api/conversations").json() == {"object": "list", "data": []}


def test_index_is_not_cached_stale(client):
    assert client.get("/").headers["cache-control"] == "no-cache"

