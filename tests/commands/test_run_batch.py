"""`qwenstack run-batch`: OpenAI batch files answered offline through the server's own app, in input order, each
bad line an error line that stops nothing."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from server_utils import BackgroundServer, tiny_served_model
from qwenstack.cli import main
from qwenstack.serving.app import create_app
from qwenstack.serving.batch import run_batch
from qwenstack.serving.config import ServerConfig

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6, "temperature": 0}


def request(custom_id: str, url: str, body: dict[str, Any], method: str = "POST") -> str:
    return json.dumps({"custom_id": custom_id, "method": method, "url": url, "body": body})


LINES = [
    request("chat", "/v1/chat/completions", CHAT),
    request("choice", "/v1/completions", {"model": "tiny", "prompt": "The", "max_tokens": 8,
                                          "guided_choice": ["north", "south"]}),
    request("embedding", "/v1/embeddings", {"model": "tiny", "input": ["a", "b"]}),
    "{not json",
    "",  # blank lines are skipped, not answered
    request("empty", "/v1/chat/completions", {**CHAT, "messages": []}),
    request("streamed", "/v1/chat/completions", {**CHAT, "stream": True}),
    request("listing", "/v1/models", {}, method="GET"),
    request("nowhere", "/v1/nowhere", {}),
]


def answered(app: Any, lines: list[str], **options: Any) -> tuple[list[dict[str, Any]], Any]:
    out: list[dict[str, Any]] = []
    summary = asyncio.run(run_batch(app, lines, out.append, **options))
    return out, summary


def test_each_line_gets_its_answer_in_order(tiny_qwen3: Path) -> None:
    served = tiny_served_model(tiny_qwen3, "tiny")
    out, summary = answered(create_app([served], ServerConfig(enable_ui=False)), LINES, max_concurrency=3)
    assert [o["custom_id"] for o in out] == ["chat", "choice", "embedding", None, "empty", "streamed", "listing",
                                             "nowhere"]
    assert len({o["id"] for o in out}) == len(out) and all(o["id"].startswith("batch_req_") for o in out)
    by_id = {o["custom_id"]: o for o in out}
    assert [by_id[k]["response"]["status_code"] for k in ("chat", "choice", "embedding", "empty", "nowhere")] == \
        [200, 200, 200, 400, 404]
    assert by_id["choice"]["response"]["body"]["choices"][0]["text"] in ("north", "south")
    assert len(by_id["embedding"]["response"]["body"]["data"]) == 2
    assert by_id["empty"]["response"]["body"]["error"]["param"] == "messages"  # the app's own error body
    for key, code in ((None, "invalid_json"), ("streamed", "invalid_request"), ("listing", "invalid_request")):
        line = by_id[key]
        assert line["response"] is None and line["error"]["code"] == code, line
    assert (summary.lines, summary.succeeded, summary.failed) == (8, 3, 5)
    # The same body through the server answers the same (greedy): a batch line is a server request.
    with BackgroundServer(create_app([tiny_served_model(tiny_qwen3, "tiny")], ServerConfig(enable_ui=False))) as srv:
        served_answer = httpx.post(srv.url + "/v1/chat/completions", json=CHAT).json()
    assert by_id["chat"]["response"]["body"]["choices"][0]["message"] == served_answer["choices"][0]["message"]


def test_many_lines_run_together_and_come_out_in_order(tiny_qwen3: Path) -> None:
    lines = [request(f"r{i}", "/v1/completions", {"model": "tiny", "prompt": "word " * (1 + i % 7),
                                                  "max_tokens": 1 + i % 5, "ignore_eos": True})
             for i in range(24)]  # ignore_eos: a random model may sample its end token before max_tokens
    app = create_app([tiny_served_model(tiny_qwen3, "tiny")], ServerConfig(enable_ui=False))
    out, summary = answered(app, lines, max_concurrency=8)
    assert [o["custom_id"] for o in out] == [f"r{i}" for i in range(24)]
    assert summary.failed == 0
    assert [o["response"]["body"]["usage"]["completion_tokens"] for o in out] == [1 + i % 5 for i in range(24)]


def test_the_command(tiny_qwen3: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QWENSTACK_API_KEY", "sk-server")  # a server's key in the environment: not asked for here
    requests, results = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    requests.write_text("\n".join(LINES[:3]) + "\n")
    argv = ["run-batch", "-i", str(requests), "-o", str(results), str(tiny_qwen3), "--served-model-name", "tiny",
            "--dtype", "float32", "--kv-cache-memory", "4MiB"]
    assert main(argv) == 0
    out = [json.loads(line) for line in results.read_text().splitlines()]
    assert [o["response"]["status_code"] for o in out] == [200, 200, 200]
    assert "3 requests: 3 succeeded, 0 failed" in capsys.readouterr().err
    requests.write_text("\n".join(LINES) + "\n")  # bad lines: answered, and the exit status says so
    assert main(argv) == 1
    assert len(results.read_text().splitlines()) == 8
    assert main(["run-batch", "-i", str(requests), "-o", str(results), str(tmp_path / "missing")]) == 1
    assert "error:" in capsys.readouterr().err
