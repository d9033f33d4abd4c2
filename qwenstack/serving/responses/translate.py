"""Responses items <-> chat messages, and a Responses request -> the chat request the chat pipeline plans.

Decisions:
- Items become the messages Qwen3's chat template expects (as Qwen-Agent sends them): a `reasoning` item
  becomes the `reasoning_content` of the assistant turn that follows it, consecutive `function_call` items one
  assistant turn with several tool calls, a `function_call_output` a `tool` message (the template wraps it in
  `<tool_response>` inside a user turn). An `mcp_call` is both: the call and its output (or its error).
- `reasoning.effort` becomes the chat `reasoning_effort`: Qwen3's thinking switch and budget (none/minimal turn
  thinking off, low and medium cap it, high and xhigh leave it unbounded; protocol.py's EFFORT_BUDGETS).
- `tool_choice` allowed_tools offers the model only the tools it lists (OpenAI: only those may be called), with
  its mode as the chat tool_choice; the other tools are left out of the prompt.
- `text.format` json_schema/json_object becomes the chat `response_format` (llguidance grammars in
  engine/grammar.py); `max_output_tokens` bounds the whole response, every turn of a tool loop included.
"""
from __future__ import annotations

import json
from typing import Any

from qwenstack.serving.errors import bad_request
from qwenstack.serving.responses.mcp_tools import error_text
from qwenstack.serving.protocol import ChatCompletionRequest
from qwenstack.serving.responses.protocol import (
    AllowedToolsChoice, FunctionCallItem, FunctionCallOutputItem, InputAudio, InputImage, InputText, McpCallItem,
    MessageItem, NamedFunctionChoice, ReasoningItem, Refusal, ResponsesRequest,
)
from qwenstack.serving.state import parse



def _parts(content: str | list[Any], where: str) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        if isinstance(part, InputText):
            parts.append({"type": "text", "text": part.text})
        elif isinstance(part, Refusal):
            parts.append({"type": "text", "text": part.refusal})
        elif isinstance(part, InputImage):
            if part.image_url is None:
                raise bad_request(f"{where}.content[{j}]: input_image needs image_url (file ids are not stored "
                                  "here)", param=f"{where}.content.{j}")
            parts.append({"type": "image_url", "image_url": {"url": part.image_url}})
        elif isinstance(part, InputAudio):
            parts.append({"type": "input_audio", "input_audio": part.input_audio.model_dump(exclude_none=True)})
    return parts


def _text(content: str | list[Any]) -> str:
    if isinstance(content, str):
        return content
    return "".join(p.text if isinstance(p, InputText) else p.refusal if isinstance(p, Refusal) else ""
                   for p in content)


def items_to_messages(items: list[Any], instructions: str | None) -> list[dict[str, Any]]:
    """Chat messages for the template, in order. Items the model does not see (tool listings, approval
    requests and responses) are skipped."""
    messages: list[dict[str, Any]] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    pending_reasoning: str | None = None

    def assistant_turn() -> dict[str, Any]:
        """The assistant message tool calls join: the last one if it has no text after its calls."""
        nonlocal pending_reasoning
        last = messages[-1] if messages else None
        if last is None or last["role"] != "assistant" or pending_reasoning is not None:
            last = {"role": "assistant", "content": ""}
            if pending_reasoning is not None:
                last["reasoning_content"] = pending_reasoning
                pending_reasoning = None
            messages.append(last)
        return last

    for i, item in enumerate(items):
        where = f"input[{i}]"
        if isinstance(item, ReasoningItem):
            texts = item.content if item.content else item.summary
            pending_reasoning = (pending_reasoning or "") + "".join(t.text for t in texts)
        elif isinstance(item, MessageItem):
            if item.role == "assistant":
                turn = {"role": "assistant", "content": _text(item.content)}
                if pending_reasoning is not None:
                    turn["reasoning_content"] = pending_reasoning
                    pending_reasoning = None
                messages.append(turn)
            else:
                messages.append({"role": item.role, "content": _parts(item.content, where)})
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            assistant_turn().setdefault("tool_calls", []).append(call)
        elif isinstance(item, FunctionCallOutputItem):
            output = item.output if isinstance(item.output, str) else _text(item.output)
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": output})
        elif isinstance(item, McpCallItem):
            call_id = item.id or f"{item.server_label}.{item.name}"
            call = {"id": call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}
            assistant_turn().setdefault("tool_calls", []).append(call)
            result = item.output if item.error is None else f"Error: {error_text(item.error)}"
            messages.append({"role": "tool", "tool_call_id": call_id, "content": result or ""})
    if pending_reasoning is not None:
        messages.append({"role": "assistant", "content": "", "reasoning_content": pending_reasoning})
    return messages


def chat_request(request: ResponsesRequest, messages: list[dict[str, Any]], tools: list[dict[str, Any]],
                 max_tokens: int | None) -> ChatCompletionRequest:
    """The chat request one model turn of this response runs as; `tools` are chat-shaped function tools
    (the client's function tools and the MCP servers' tools)."""
    body: dict[str, Any] = {"model": request.model, "messages": messages}
    if not messages:
        raise bad_request("the conversation is empty: give input (or a previous_response_id)", param="input")
    for name in ("temperature", "top_p", "parallel_tool_calls", "seed", "user"):
        value = getattr(request, name)
        if value is not None:
            body[name] = value
    if max_tokens is not None:
        body["max_completion_tokens"] = max_tokens
    if request.wants_logprobs:
        body.update(logprobs=True, top_logprobs=request.top_logprobs or 0)
    if tools:
        body["tools"] = tools
    choice = request.tool_choice
    if isinstance(choice, NamedFunctionChoice):
        body["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    elif choice is not None and not isinstance(choice, str):
        body["tool_choice"] = choice.mode
    elif choice is not None:
        body["tool_choice"] = choice
    if body.get("tool_choice") not in (None, "none", "auto") and not tools:
        raise bad_request("tool_choice requires tools", param="tool_choice")
    if request.reasoning and request.reasoning.effort is not None:
        body["reasoning_effort"] = request.reasoning.effort  # chat reads it as Responses does (protocol.py)
    fmt = request.text.format if request.text else None
    if fmt is not None and fmt.type == "json_schema":
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": fmt.name or "response", "schema": fmt.schema_, "strict": fmt.strict}}
    elif fmt is not None and fmt.type == "json_object":
        body["response_format"] = {"type": "json_object"}
    return parse(ChatCompletionRequest, body)


def offered(choice: Any, name: str, server_label: str | None = None) -> bool:
    """Whether the model is offered this function tool (or this MCP server's tool): a tool_choice of type
    allowed_tools offers only what it lists ({"type": "function", "name"}, {"type": "mcp", "server_label"} with an
    optional "name"); any other tool_choice offers every tool."""
    if not isinstance(choice, AllowedToolsChoice):
        return True
    for entry in choice.tools:
        if server_label is None and entry.get("type") == "function" and entry.get("name") == name:
            return True
        if (server_label is not None and entry.get("type") == "mcp" and entry.get("server_label") == server_label
                and entry.get("name") in (None, name)):
            return True
    return False


def function_tools(request: ResponsesRequest) -> list[dict[str, Any]]:
    """The client's function tools in the chat shape (those tool_choice offers)."""
    out = []
    for tool in request.tools or []:
        if tool.type == "function" and offered(request.tool_choice, tool.name):
            fn: dict[str, Any] = {"name": tool.name, "parameters": tool.parameters or {"type": "object", "properties": {}}}
            if tool.description:
                fn["description"] = tool.description
            out.append({"type": "function", "function": fn})
    return out


def arguments_object(arguments: str) -> dict[str, Any]:
    """A tool call's arguments as the JSON object an MCP server takes ({} when the model wrote none)."""
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        raise ValueError(f"the arguments are not valid JSON: {arguments[:200]!r}") from None
    if not isinstance(value, dict):
        raise ValueError("the arguments are not a JSON object")
    return value
