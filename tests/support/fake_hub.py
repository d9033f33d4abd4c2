"""A Hugging Face Hub stand-in on 127.0.0.1 (what `huggingface_hub.snapshot_download` asks for: repo info, the
file tree, and files by HEAD/GET with Range), so `qwenstack pull` is tested without the real hub.

    with FakeHub({"org/model": {"config.json": b"{...}", "model.safetensors": b"..."}}) as hub:
        snapshot_download("org/model", endpoint=hub.url, ...)
"""
from __future__ import annotations

import hashlib
import http.server
import json
import re
import threading
from typing import Any
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self, repos: dict[str, dict[str, bytes]]) -> None:
        self.repos = repos
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                hub._serve(self, body=False)

            def do_GET(self) -> None:
                hub._serve(self, body=True)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    @staticmethod
    def _blob_id(data: bytes) -> str:
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    def _json(self, handler: Any, value: Any, body: bool) -> None:
        data = json.dumps(value).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if body:
            handler.wfile.write(data)

    def _missing(self, handler: Any) -> None:
        handler.send_response(404)
        handler.send_header("X-Error-Code", "RepoNotFound")
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    def _serve(self, handler: Any, body: bool) -> None:
        path = unquote(urlparse(handler.path).path)
        self.requests.append((handler.command, path, handler.headers.get("Range")))
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/([^/]+)", path):
            files = self.repos.get(m[1])
            if files is None:
                return self._missing(handler)
            return self._json(handler, {"id": m[1], "sha": COMMIT, "private": False,
                                        "siblings": [{"rfilename": f} for f in files]}, body)
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path):
            files = self.repos.get(m[1])
            if files is None:
                return self._missing(handler)
            entries = [{"type": "file", "oid": self._blob_id(d), "size": len(d), "path": f} for f, d in files.items()]
            return self._json(handler, entries, body)
        if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            data = self.repos.get(m[1], {}).get(m[3])
            if data is None:
                return self._missing(handler)
            start = 0
            if (rng := handler.headers.get("Range")) and (r := re.fullmatch(r"bytes=(\d+)-", rng)):
                start = int(r[1])
            handler.send_response(206 if start else 200)
            handler.send_header("X-Repo-Commit", COMMIT)
            handler.send_header("ETag", f'"{self._blob_id(data)}"')
            handler.send_header("Content-Length", str(len(data) - start))
            handler.end_headers()
            if body:
                handler.wfile.write(data[start:])
            return None
        return self._missing(handler)
