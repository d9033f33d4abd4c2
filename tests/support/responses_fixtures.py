"""Shared by the /v1/responses tests: scripted checkpoints for agents, an MCP test server, a served app."""
from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Any

from scripted import CASES, ScriptedCheckpoint, build_scripted_checkpoint

# Calls two tools at once; once a tool result is in the prompt, answers.
AGENT_SCRIPT = ("<think>\nWeather and time in Paris: two calls.\n</think>\n\n"
                '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
                '<tool_call>\n{"name": "get_time", "arguments": {"city": "Paris, France"}}\n</tool_call>')
AGENT_ANSWER = "Paris is sunny at 21 C; the clock did not answer."
# Calls a tool on every turn, whatever the tools said: a model stuck in a loop.
LOOP_SCRIPT = ("<think>\nStill unsure, so I check again.\n</think>\n\n"
               '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>')
THINK_ANSWER = CASES["think_answer"]


def build_agent(path: Path) -> ScriptedCheckpoint:
    return build_scripted_checkpoint(path, AGENT_SCRIPT, after_tool=AGENT_ANSWER)


def build_looper(path: Path) -> ScriptedCheckpoint:
    return build_scripted_checkpoint(path, LOOP_SCRIPT)


def chat_api_models(root: Path, tiny: Path) -> list[Any]:
    """The served models the Anthropic and Ollama API tests share: scripted "think" and "agent", "short" (think
    with a context that ends within its answer) and "tiny" (random weights: it goes on from any text)."""
    from server_utils import tiny_served_model

    think = build_scripted_checkpoint(root / "think", THINK_ANSWER)
    return [tiny_served_model(think.path, "think"), tiny_served_model(build_agent(root / "agent").path, "agent"),
            tiny_served_model(think.path, "short", max_model_len=30), tiny_served_model(tiny, "tiny")]


def mcp_test_app(token: str | None = None, weather_hangs_s: float | None = None) -> Any:
    """An MCP server (the `mcp` package's MCPServer) with two tools, get_time always failing; with `token`, HTTP
    requests without `Authorization: Bearer <token>` get a 401; with `weather_hangs_s`, get_weather answers only
    after that long (a tool call that hangs while the server itself is fine)."""
    import anyio
    from mcp.server.mcpserver import MCPServer

    server = MCPServer("weather-station")

    @server.tool()
    async def get_weather(city: str) -> str:
        """Current weather in a city."""
        if weather_hangs_s is not None:
            await anyio.sleep(weather_hangs_s)
        return f"{city}: sunny, 21 C"

    @server.tool()
    def get_time(city: str) -> str:
        """Local time in a city."""
        raise RuntimeError(f"the clock of {city} is broken")

    app = server.streamable_http_app()
    return app if token is None else _BearerOnly(app, token)


class _BearerOnly:
    def __init__(self, app: Any, token: str) -> None:
        self.app, self.expected = app, f"Bearer {token}".encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and dict(scope["headers"]).get(b"authorization") != self.expected:
            await send({"type": "http.response.start", "status": 401, "headers": [(b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return
        await self.app(scope, receive, send)


class HangingServer:
    """A TCP port that accepts connections and never answers (an MCP server that hangs)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/mcp"

    def _accept(self) -> None:
        try:
            while True:
                self.conns.append(self.sock.accept()[0])
        except OSError:
            return

    def __enter__(self) -> "HangingServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        for c in self.conns:
            c.close()
        self.sock.close()
