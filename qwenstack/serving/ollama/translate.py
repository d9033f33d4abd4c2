"""An Ollama request -> the chat request serving/chat.py plans, and the chat parser's output -> Ollama's message.

Decisions:
- A last assistant message is continued, as Ollama does (chat's continue_final_message): the answer is what
  follows its text.
- Messages map one to one: `images` (base64, no data: prefix) become image parts before the text, as Qwen's
  vision examples order them (vision models only: a 400 otherwise); an assistant turn's `thinking` becomes its
  `reasoning_content` and its `tool_calls` (arguments an object) its tool calls; a `tool` message's
  `tool_name` becomes its name. /api/generate's templated prompt is one user turn after an optional system
  turn, as Ollama renders it.
- `think`: omitted is the server's default, which for Qwen3 is thinking on, as Ollama does for qwen3 (the
  thinking arrives in `message.thinking`, never in `content`); `--default-chat-template-kwargs` may turn it off.
  true/false switch it; "low"/"medium" cap it at chat's reasoning_effort budgets (1,024 and 8,192 tokens),
  "high" leaves it unbounded, "max" is reasoning_effort "xhigh" (unbounded too).
- `format`: "json" is response_format json_object, a schema json_schema, both enforced by chat's grammar on the
  answer after any thinking (Ollama too lets the model think first).
- `options`: num_predict > 0 is max_tokens (thinking included, as Ollama counts it), 0 or negative no limit;
  a negative seed (Ollama's -1) is a random one; repeat_penalty is repetition_penalty; temperature, top_p,
  top_k, min_p, presence_penalty, frequency_penalty and stop are chat's. Omitted ones are the checkpoint's
  generation_config.json values, as chat's are (not Ollama's Modelfile defaults).
- Tool calls come out in Ollama's shape: `{id, function: {index, name, arguments}}` with the arguments an object
  (read as /v1/messages reads them: anything but an object is {}). A turn that made calls ends with
  done_reason "stop", as Ollama's do; one cut by num_predict or the context ends "length"; one the guard stopped
  (finish_reason "content_filter") ends "stop", Ollama having no content filter.
"""
from __future__ import annotations

from typing import Any

from qwenstack.serving.errors import bad_request
from qwenstack.serving.messages.translate import tool_input
from qwenstack.serving.ollama.protocol import (
    OllamaChatRequest, OllamaGenerateRequest, OllamaMessage, OllamaOptions, _Generating,
)
from qwenstack.serving.parsers import ToolCallDelta
from qwenstack.serving.protocol import ChatCompletionRequest, ends_in_prefill
from qwenstack.serving.state import parse

EFFORTS = {"low": "low", "medium": "medium", "high": "high", "max": "xhigh"}


def image_part(data: str) -> dict[str, Any]:
    # The image's format is read from its bytes (multimodal/image_processing.py); the media type only says image.
    return {"type": "image_url", "image_url": {"url": f"data:image/*;base64,{data}"}}


def _content(text: str, images: list[str] | None) -> str | list[dict[str, Any]]:
    if not images:
        return text
    return [*(image_part(i) for i in images), *([{"type": "text", "text": text}] if text else [])]


def chat_message(message: OllamaMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message.role, "content": _content(message.content, message.images)}
    if message.thinking:
        out["reasoning_content"] = message.thinking
    if message.tool_calls:
        out["tool_calls"] = [{"id": call.id or f"call_{i}", "type": "function",
                              "function": {"name": call.function.name, "arguments": call.function.arguments}}
                             for i, call in enumerate(message.tool_calls)]
    if message.tool_name:
        out["name"] = message.tool_name
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    return out


def _format(value: str | dict[str, Any]) -> dict[str, Any] | None:
    if value == "":
        return None
    if value == "json":
        return {"type": "json_object"}
    return {"type": "json_schema", "json_schema": {"name": "format", "schema": value}}


def _sampling(options: OllamaOptions | None) -> dict[str, Any]:
    if options is None:
        return {}
    body: dict[str, Any] = {}
    if options.num_predict is not None and options.num_predict > 0:
        body["max_completion_tokens"] = options.num_predict
    if options.seed is not None and options.seed >= 0:
        body["seed"] = options.seed
    if options.repeat_penalty is not None:
        body["repetition_penalty"] = options.repeat_penalty
    for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "stop"):
        value = getattr(options, name)
        if value is not None:
            body[name] = value
    return body


def _thinking(think: bool | str | None) -> dict[str, Any]:
    if think is None:
        return {}  # the server's default_chat_template_kwargs, else Qwen3's default: on
    if isinstance(think, bool):
        return {"chat_template_kwargs": {"enable_thinking": think}}
    return {"chat_template_kwargs": {"enable_thinking": True}, "reasoning_effort": EFFORTS[think]}


def _chat_body(request: _Generating, messages: list[dict[str, Any]]) -> dict[str, Any]:
    body: dict[str, Any] = {"model": request.model, "messages": messages, **_sampling(request.options),
                            **_thinking(request.think)}
    response_format = _format(request.format)
    if response_format is not None:
        body["response_format"] = response_format
    if request.logprobs or request.top_logprobs:
        body.update(logprobs=True, top_logprobs=request.top_logprobs or 0)
    return body


def chat_request(request: OllamaChatRequest) -> ChatCompletionRequest:
    messages = [chat_message(m) for m in request.messages]
    body = _chat_body(request, messages)
    if ends_in_prefill(messages):
        body["continue_final_message"] = True  # Ollama continues a last assistant message
    if request.tools:
        body["tools"] = [t.model_dump(exclude_none=True) for t in request.tools]
    return parse(ChatCompletionRequest, body)


def generate_request(request: OllamaGenerateRequest) -> ChatCompletionRequest:
    """The chat request of /api/generate: its prompt as one user turn (raw: as a stand-in, never rendered)."""
    if request.suffix and request.images:
        raise bad_request("suffix (fill-in-the-middle) does not take images", param="images")
    if request.template:
        raise bad_request("a custom template is not supported: the model's own chat template is used (or raw: "
                          "true with a prompt already templated)", param="template")
    if request.context:
        raise bad_request("context (deprecated in Ollama) is not supported: keep a conversation with /api/chat",
                          param="context")
    if request.raw and request.system:
        raise bad_request("raw mode does not support system: put it in the prompt", param="system")
    if request.raw and request.images:
        raise bad_request("raw mode does not support images: leave raw off so the chat template places them",
                          param="images")
    messages = [{"role": "system", "content": request.system}] if request.system else []
    messages.append({"role": "user", "content": _content(request.prompt, request.images)})
    return parse(ChatCompletionRequest, _chat_body(request, messages))


def tool_calls(deltas: list[ToolCallDelta]) -> list[dict[str, Any]]:
    """The calls a parsed delta completes, in Ollama's shape. The chat parser sends each call whole, its id and
    name then its arguments, in one delta."""
    calls: dict[int, dict[str, Any]] = {}
    arguments: dict[int, str] = {}
    for d in deltas:
        call = calls.setdefault(d.index, {"id": "", "function": {"index": d.index, "name": ""}})
        call["id"] = d.id or call["id"]
        call["function"]["name"] = d.name or call["function"]["name"]
        arguments[d.index] = arguments.get(d.index, "") + d.arguments
    for index, call in calls.items():
        call["function"]["arguments"] = tool_input(arguments[index])
    return [calls[i] for i in sorted(calls)]


def done_reason(finish_reason: str | None) -> str:
    return "length" if finish_reason == "length" else "stop"
