"""Server-side MCP tools: connect to MCP servers, list their tools, call them, within timeouts.

Decisions:
- Each operation opens its own short connection in its own task (asyncio.wait_for), so a server that is down
  or hangs costs at most the timeout and the MCP SDK's task groups never span the response's generator.
- Streamable HTTP by URL. `stdio:COMMAND ARGS` servers start a process on this machine, so they are accepted
  only as operator-registered servers (`--mcp NAME=stdio:...`) and only with `--mcp-allow-stdio`; a request
  naming a stdio command is refused.
- Failures never escape as exceptions to the client: a listing that fails is a failed `mcp_list_tools` item; a
  call that fails, errors or times out is a tool result (the error text) the model reads next turn.
"""
from __future__ import annotations

import asyncio
import json
import shlex
from dataclasses import dataclass, field
from typing import Any

from qwenstack.serving.errors import bad_request
from qwenstack.serving.responses.protocol import McpTool

STDIO_SCHEME = "stdio:"
STDIO_START_S = 30.0  # added to a stdio server's timeouts: starting a process (Python imports) is not a hang


@dataclass
class McpTarget:
    label: str
    url: str  # http(s)://... or stdio:COMMAND ARGS
    headers: dict[str, str] = field(default_factory=dict)
    spec: McpTool | None = None  # the request's tool entry (allowed_tools, require_approval)

    def timeout(self, base_s: float) -> float:
        return base_s + STDIO_START_S if self.url.startswith(STDIO_SCHEME) else base_s

    def client(self) -> Any:
        from mcp import Client, StdioServerParameters
        from mcp.client.streamable_http import streamable_http_client
        from mcp.shared._httpx_utils import create_mcp_http_client

        if self.url.startswith(STDIO_SCHEME):
            argv = shlex.split(self.url[len(STDIO_SCHEME):])
            return Client(StdioServerParameters(command=argv[0], args=argv[1:]))
        if self.headers:
            return Client(streamable_http_client(self.url, http_client=create_mcp_http_client(headers=self.headers)))
        return Client(self.url)


def parse_mcp(text: str) -> tuple[str, str]:
    """`--mcp NAME=URL` -> (NAME, URL)."""
    name, sep, url = text.partition("=")
    if not sep or not name.strip() or not url.strip():
        raise ValueError(f"--mcp expects NAME=URL (or NAME=stdio:COMMAND), got {text!r}")
    return name.strip(), url.strip()


def check_registered(servers: dict[str, str], allow_stdio: bool) -> None:
    """Operator config: every URL is http(s) or, with allow_stdio, a stdio command."""
    for name, url in servers.items():
        if url.startswith(STDIO_SCHEME):
            if not allow_stdio:
                raise ValueError(f"--mcp {name}: stdio MCP servers run commands on this machine; "
                                 "pass --mcp-allow-stdio to allow them")
            if not shlex.split(url[len(STDIO_SCHEME):]):
                raise ValueError(f"--mcp {name}: stdio: needs a command")
        elif not url.startswith(("http://", "https://")):
            raise ValueError(f"--mcp {name}: the URL must be http(s):// or stdio:COMMAND, got {url!r}")


def resolve(tool: McpTool, registered: dict[str, str], allow_stdio: bool, index: int) -> McpTarget:
    """The server a request's mcp tool names: its server_url, or the operator-registered server of its label."""
    param = f"tools.{index}"
    if tool.server_url is None:
        url = registered.get(tool.server_label)
        if url is None:
            known = ", ".join(sorted(registered)) or "none"
            raise bad_request(f"tools[{index}]: no server_url, and no MCP server '{tool.server_label}' is "
                              f"registered on this server (registered: {known})", param=param)
        if url.startswith(STDIO_SCHEME) and not allow_stdio:
            raise bad_request(f"tools[{index}]: stdio MCP servers are not allowed here", param=param)
    else:
        url = tool.server_url
        if url.startswith(STDIO_SCHEME):
            raise bad_request(f"tools[{index}]: stdio MCP servers run commands on the server's machine; only the "
                              "operator may register them (--mcp NAME=stdio:... with --mcp-allow-stdio)",
                              param=f"{param}.server_url", code="stdio_not_allowed")
        if not url.startswith(("http://", "https://")):
            raise bad_request(f"tools[{index}]: server_url must be http(s)://", param=f"{param}.server_url")
    return McpTarget(tool.server_label, url, dict(tool.headers or {}), tool)


def _error_text(exc: BaseException, timeout_s: float) -> str:
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return f"timed out after {timeout_s:g} s"
    if isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        return _error_text(exc.exceptions[0], timeout_s)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def list_tools(target: McpTarget, timeout_s: float) -> list[dict[str, Any]]:
    """The server's tools as Responses `mcp_list_tools` entries; raises McpFailure on any failure."""
    async def work() -> list[dict[str, Any]]:
        async with target.client() as client:
            result = await client.list_tools()
        return [{"name": t.name, "description": t.description, "input_schema": t.input_schema,
                 "annotations": t.annotations.model_dump(exclude_none=True) if t.annotations else None}
                for t in result.tools]

    timeout_s = target.timeout(timeout_s)
    try:
        tools = await asyncio.wait_for(work(), timeout_s)
    except Exception as exc:  # noqa: BLE001 - every failure becomes the item's error
        raise McpFailure(_error_text(exc, timeout_s)) from exc
    return [t for t in tools if target.spec is None or target.spec.allows(t["name"])]


def execution_error(text: str) -> dict[str, Any]:
    """An `mcp_call` error the tool itself reported (OpenAI's McpToolExecutionError shape)."""
    return {"type": "mcp_tool_execution_error", "content": [{"type": "text", "text": text}]}


def protocol_error(text: str) -> dict[str, Any]:
    """An `mcp_call` error on the way to the tool: unreachable, timed out, bad arguments."""
    return {"type": "mcp_protocol_error", "code": -32000, "message": text}


def error_text(error: str | dict[str, Any]) -> str:
    """What the model reads for a failed call."""
    if isinstance(error, str):
        return error
    if error.get("message"):
        return str(error["message"])
    content = error.get("content")
    if isinstance(content, list):
        return "\n".join(str(c.get("text", "")) for c in content if isinstance(c, dict))
    return str(content)


async def call_tool(target: McpTarget, name: str, arguments: dict[str, Any],
                    timeout_s: float) -> tuple[str | None, dict[str, Any] | None]:
    """(output, error): exactly one is set. The output is the tool's text (structured content as JSON)."""
    async def work() -> Any:
        async with target.client() as client:
            return await client.call_tool(name, arguments)

    timeout_s = target.timeout(timeout_s)
    try:
        result = await asyncio.wait_for(work(), timeout_s)
    except Exception as exc:  # noqa: BLE001 - the model reads the error as the tool's result
        return None, protocol_error(_error_text(exc, timeout_s))
    texts = [getattr(part, "text", None) for part in result.content]
    text = "\n".join(t for t in texts if t is not None)
    if not text and result.structured_content is not None:
        text = json.dumps(result.structured_content)
    if result.is_error:
        return None, execution_error(text or "the tool failed")
    return text, None


class McpFailure(Exception):
    pass


def chat_tool(tool: dict[str, Any]) -> dict[str, Any]:
    """An MCP tool listing entry as a chat function tool for the template."""
    fn: dict[str, Any] = {"name": tool["name"],
                          "parameters": tool.get("input_schema") or {"type": "object", "properties": {}}}
    if tool.get("description"):
        fn["description"] = tool["description"]
    return {"type": "function", "function": fn}
