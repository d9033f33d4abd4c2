"""A Messages request -> the chat request serving/chat.py plans, and the chat parser's output -> content blocks.

Decisions:
- Blocks become the messages Qwen3's chat template expects, as /v1/responses does for items: an assistant
  turn's `thinking` blocks become its `reasoning_content` (signatures are ignored; `redacted_thinking` is
  dropped), its `tool_use` blocks its tool calls (the input object as the arguments); a user turn's
  `tool_result` blocks become `tool` messages in order (the template wraps them in `<tool_response>`), with the
  user text around them as user messages. `is_error` prefixes the result with "Error: ".
- `system` (a string, or text blocks one per line, as chat joins text parts) is the first system message.
  Claude Code's `x-anthropic-billing-header: ...` block is dropped (as vLLM does): it carries a per-request
  hash, and at the head of the prompt it would keep every turn from reusing the previous turn's prefix cache.
- Images: a base64 source becomes a data URL, a url source is passed on as it is (fetched only where the
  server allows remote image URLs, `--allow-remote-image-urls`); both only for vision models (400 otherwise).
  File sources need the Files API, which this server does not have (400).
- Documents: a text source, inline content (text and image blocks) or base64 of a text/* media type becomes
  the user's text as `<document title="...">` context, text, `</document>` (the title and context only when
  given), images beside it; citations are not produced. PDFs, URL and file sources are a 400 naming the block:
  reading them needs a PDF parser and fetches this server does not do.
- Thinking: `{type: "enabled", budget_tokens}` is Qwen3's thinking with that budget, `adaptive` thinking
  without a budget, `disabled` no thinking. Omitted, thinking is off (Anthropic's default) unless the server's
  default_chat_template_kwargs (ServerConfig) sets enable_thinking: an Anthropic client that wants thinking
  asks for it (Claude Code sends `thinking` when the user turns thinking on), and its background requests
  (titles, summaries, command checks) come without it and with small max_tokens that a think block would use
  up, leaving no answer.
  `output_config.effort` caps the budget as chat's reasoning_effort does (max = xhigh: unbounded).
- A last message from the assistant is a prefill (Anthropic's "putting words in Claude's mouth"): the model goes
  on writing it (chat's continue_final_message), and the response holds only what follows it.
- `tool_choice` any -> required, tool -> a named function (both forced by a grammar), none -> no tools in the
  prompt; `disable_parallel_tool_use` -> parallel_tool_calls false. Server tools (a `type` other than
  "custom") are not run here and are left out of the prompt.
"""
from __future__ import annotations

import base64
import hashlib
from typing import Any

from pydantic_core import from_json

from qwenstack.guard.rails import CONTENT_FILTER
from qwenstack.serving.errors import bad_request
from qwenstack.serving.messages.protocol import (
    Base64Source, ContentSource, CountTokensRequest, DocumentBlock, FileSource, ImageBlock, MessagesRequest,
    RedactedThinkingBlock, TextBlock, TextSource, ThinkingBlock, ToolResultBlock, ToolUseBlock,
)
from qwenstack.serving.protocol import ChatCompletionRequest, ends_in_prefill
from qwenstack.serving.state import parse

BILLING_HEADER = "x-anthropic-billing-header"  # a system block Claude Code adds for Anthropic's billing
EFFORTS = {"low": "low", "medium": "medium", "high": "high", "xhigh": "xhigh", "max": "xhigh"}


def _image_part(block: ImageBlock, where: str) -> dict[str, Any]:
    source = block.source
    if isinstance(source, FileSource):
        raise bad_request(f"{where}: file sources need the Files API, which this server does not have: send the "
                          "image as base64 or url", param=f"{where}.source")
    url = f"data:{source.media_type};base64,{source.data}" if isinstance(source, Base64Source) else source.url
    return {"type": "image_url", "image_url": {"url": url}}


def _document_parts(block: DocumentBlock, where: str) -> list[dict[str, Any]]:
    """A document as chat parts: its text wrapped with its title and context, any images of inline content."""
    source, images, texts = block.source, [], []
    if isinstance(source, TextSource):
        texts.append(source.data)
    elif isinstance(source, ContentSource):
        blocks = [TextBlock(type="text", text=source.content)] if isinstance(source.content, str) else source.content
        texts += [b.text for b in blocks if isinstance(b, TextBlock)]
        images += [_image_part(b, f"{where}.source.content.{j}") for j, b in enumerate(blocks)
                   if isinstance(b, ImageBlock)]
    elif isinstance(source, Base64Source) and source.media_type.startswith("text/"):
        try:
            texts.append(base64.b64decode(source.data, validate=True).decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise bad_request(f"{where}: the document's base64 data is not UTF-8 text",
                              param=f"{where}.source") from None
    else:
        kind = source.media_type if isinstance(source, Base64Source) else f"a {source.type} source"
        raise bad_request(f"{where}: documents of {kind} are not supported here (no PDF reading, fetching or Files "
                          f"API): send the document's text as a text source", param=f"{where}.source")
    title = f' title="{block.title}"' if block.title else ""
    head = f"<document{title}>\n" + (f"{block.context}\n\n" if block.context else "")
    return [{"type": "text", "text": head + "\n".join(texts) + "\n</document>"}, *images]


def _part(block: Any, where: str) -> dict[str, Any]:
    if isinstance(block, TextBlock):
        return {"type": "text", "text": block.text}
    return _image_part(block, where)


def _parts(block: Any, where: str) -> list[dict[str, Any]]:
    """A user-side block as chat parts (a document may give several)."""
    return _document_parts(block, where) if isinstance(block, DocumentBlock) else [_part(block, where)]


def _tool_output(block: ToolResultBlock, where: str) -> str | list[dict[str, Any]]:
    content = block.content
    if isinstance(content, str):
        return f"Error: {content}" if block.is_error else content
    parts = [part for j, p in enumerate(content) for part in _parts(p, f"{where}.content.{j}")]
    if block.is_error:
        if parts and parts[0]["type"] == "text":
            parts[0] = {"type": "text", "text": f"Error: {parts[0]['text']}"}
        else:
            parts.insert(0, {"type": "text", "text": "Error"})
    return parts


def _assistant(blocks: list[Any], where: str) -> dict[str, Any]:
    texts: list[dict[str, Any]] = []
    thinking: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(blocks):
        if isinstance(block, TextBlock):
            texts.append({"type": "text", "text": block.text})
        elif isinstance(block, ThinkingBlock):
            thinking.append(block.thinking)
        elif isinstance(block, ToolUseBlock):
            calls.append({"id": block.id, "type": "function",
                          "function": {"name": block.name, "arguments": block.input}})
        elif not isinstance(block, RedactedThinkingBlock):
            raise bad_request(f"{where}.content.{j}: an assistant message carries text, thinking and tool_use "
                              f"blocks, not {block.type}", param=f"{where}.content.{j}")
    turn: dict[str, Any] = {"role": "assistant", "content": texts or ""}
    if thinking:
        turn["reasoning_content"] = "".join(thinking)
    if calls:
        turn["tool_calls"] = calls
    return turn


def _user(blocks: list[Any], where: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for j, block in enumerate(blocks):
        at = f"{where}.content.{j}"
        if isinstance(block, ToolResultBlock):
            if parts:  # text before a result stays before it
                out.append({"role": "user", "content": parts})
                parts = []
            out.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": _tool_output(block, at)})
        elif isinstance(block, (TextBlock, ImageBlock, DocumentBlock)):
            parts += _parts(block, at)
        else:
            raise bad_request(f"{at}: a user message carries text, image, document and tool_result blocks, not "
                              f"{block.type}", param=at)
    if parts or not out:
        out.append({"role": "user", "content": parts})
    return out


def chat_messages(request: CountTokensRequest) -> list[dict[str, Any]]:
    """The conversation as chat messages, in order."""
    out: list[dict[str, Any]] = []
    system = request.system
    if isinstance(system, list):  # without Claude Code's billing line (a per-request hash: no prefix reuse)
        system = [_part(b, "system") for b in system if not b.text.startswith(BILLING_HEADER)]
    if system:
        out.append({"role": "system", "content": system})
    for i, message in enumerate(request.messages):
        where = f"messages.{i}"
        if isinstance(message.content, str):
            out.append({"role": message.role, "content": message.content})
        elif message.role == "assistant":
            out.append(_assistant(message.content, where))
        elif message.role == "system":
            if any(not isinstance(b, TextBlock) for b in message.content):
                raise bad_request(f"{where}: a system message carries text blocks only", param=f"{where}.content")
            out.append({"role": "system", "content": [_part(b, where) for b in message.content]})
        else:
            out += _user(message.content, where)
    return out


def _tools(request: CountTokensRequest) -> list[dict[str, Any]]:
    out = []
    for i, tool in enumerate(request.tools or []):
        if tool.type not in (None, "custom"):
            continue  # a server tool: Anthropic runs it, this server does not
        if tool.input_schema is None:
            raise bad_request(f"tools.{i}: a custom tool needs input_schema", param=f"tools.{i}.input_schema")
        fn: dict[str, Any] = {"name": tool.name, "parameters": tool.input_schema}
        if tool.description:
            fn["description"] = tool.description
        out.append({"type": "function", "function": fn})
    return out


def thinking_on(request: CountTokensRequest, default: bool) -> bool:
    return default if request.thinking is None else request.thinking.type != "disabled"


def chat_request(request: CountTokensRequest, default_thinking: bool, counting: bool = False) -> ChatCompletionRequest:
    """The chat request this message request runs as. `counting`: for count_tokens (the prompt only: a forced
    tool choice renders as "auto" does, without building its grammar)."""
    messages = chat_messages(request)
    body: dict[str, Any] = {"model": request.model, "messages": messages,
                            "chat_template_kwargs": {"enable_thinking": thinking_on(request, default_thinking)}}
    if ends_in_prefill(messages):
        body["continue_final_message"] = True  # the answer goes on from the assistant's text
    if isinstance(request, MessagesRequest):
        body["max_completion_tokens"] = request.max_tokens
        for name in ("temperature", "top_p", "top_k"):
            value = getattr(request, name)
            if value is not None:
                body[name] = value
        if request.stop_sequences:
            body["stop"] = request.stop_sequences
    thinking = request.thinking
    if thinking is not None and thinking.type == "enabled" and thinking.budget_tokens is not None:
        body["thinking_budget"] = thinking.budget_tokens
    config = request.output_config
    if config is not None and config.effort is not None:
        body["reasoning_effort"] = EFFORTS[config.effort]
    if config is not None and config.format is not None and not counting:
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "output", "schema": config.format.schema_}}
    tools = _tools(request)
    if tools:
        body["tools"] = tools
    choice = request.tool_choice
    if choice is not None:
        names = {t["function"]["name"] for t in tools}
        if choice.type != "none" and not tools:
            raise bad_request(f'tool_choice "{choice.type}" needs tools', param="tool_choice")
        if choice.type == "tool" and choice.name not in names:
            raise bad_request(f"tool_choice names '{choice.name}', which is not among the tools",
                              param="tool_choice.name")
        if choice.type == "none":
            body["tool_choice"] = "none"
        elif counting or choice.type == "auto":
            body["tool_choice"] = "auto"
        elif choice.type == "any":
            body["tool_choice"] = "required"
        else:
            body["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
        if choice.disable_parallel_tool_use:
            body["parallel_tool_calls"] = False
    return parse(ChatCompletionRequest, body)


# --- output ---------------------------------------------------------------------------------------------


def tool_input(arguments: str) -> dict[str, Any]:
    """A tool call's arguments as the object a tool_use block carries. Read as the SDK reads streamed
    input_json_delta fragments (partial JSON allowed: a call cut off by max_tokens keeps what was written), so the
    streamed and the whole message agree; anything but an object is {}."""
    if not arguments.strip():
        return {}
    try:
        value = from_json(arguments, allow_partial=True)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def signature(thinking: str) -> str:
    """A thinking block's signature: a digest of its text (clients that check for one get one; nothing verifies
    it when the block comes back)."""
    return hashlib.sha256(thinking.encode("utf-8")).hexdigest()[:32]


def stop_reason(finish_reason: str | None, stop: int | str | None, made_calls: bool, output_tokens: int,
                max_tokens: int) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) of a finished turn. A turn that hit the context's end before max_tokens
    (max_tokens is capped at the room the context leaves) is "model_context_window_exceeded", as Anthropic
    answers it. A turn the guard stopped (finish_reason "content_filter") is a "refusal"."""
    if finish_reason == CONTENT_FILTER:
        return "refusal", None
    if finish_reason == "length":
        return ("max_tokens" if output_tokens >= max_tokens else "model_context_window_exceeded"), None
    if made_calls:
        return "tool_use", None
    if isinstance(stop, str):
        return "stop_sequence", stop
    return "end_turn", None
