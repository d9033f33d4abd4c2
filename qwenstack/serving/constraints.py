"""Logits processors the chat endpoint composes: structured output (response_format), forced tool calls
(tool_choice required or named) and the thinking budget, all compatible with Qwen3's thinking block.

Decisions:
- The grammar applies to the answer, not to the thinking: `ThinkingGate` leaves the think block free
  and constrains what follows `</think>` (vLLM does the same with a reasoning parser). When the model may
  choose whether to think, the first token may be `<think>` or whatever the grammar allows.
- A forced tool call is the token prefix `<tool_call>\\n` followed by JSON that must match
  {"name": <one of the allowed tools>, "arguments": <its parameters schema>}; the output parser then
  reads it as an ordinary call. Only one call is forced (the grammar ends the turn after it).
- The JSON grammar itself comes from `qwenstack.serving.structured.make_json_processor(tokenizer,
  response_format)` and the budget from `qwenstack.serving.thinking.make_thinking_budget_processor(
  tokenizer, budget)`; both are imported when a request needs them. Their processors see
  `output_token_ids` starting where their constraint starts (the tokens after `</think>` or after the
  forced prefix), and may keep state across calls.
- The engine clones a request's processor list for each of n samples, sharing the objects; stateful
  processors are therefore wrapped in `PerSequence`, which keeps one instance per sequence (keyed by the
  sequence's own output list, which lives as long as the sequence).
"""
from __future__ import annotations

import enum
from typing import Any, Callable

import torch

from qwenstack.engine.params import LogitsProcessor
from qwenstack.serving.errors import APIError, bad_request
from qwenstack.serving.protocol import ChatCompletionRequest, NamedToolChoice
from qwenstack.tokenizer import Tokenizer

THINK_START = "<think>"
THINK_END = "</think>"
TOOL_CALL_START = "<tool_call>"


class ThinkingPhase(enum.Enum):
    MAY_THINK = "may_think"  # thinking on, the model opens the block itself (Qwen3 templates up to 2507)
    THINKING = "thinking"  # the prompt already opened the block (`<think>\n` at its end)
    ANSWER = "answer"  # thinking off: constrain from the first token


class PerSequence:
    """One processor instance per sequence of a request (n > 1 shares the request's processor list)."""

    def __init__(self, first: LogitsProcessor, factory: Callable[[], LogitsProcessor]) -> None:
        self._first: LogitsProcessor | None = first
        self._factory = factory
        self._by_seq: dict[int, LogitsProcessor] = {}

    def __call__(self, output_token_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        key = id(output_token_ids)
        processor = self._by_seq.get(key)
        if processor is None:
            processor, self._first = (self._first, None) if self._first is not None else (self._factory(), None)
            self._by_seq[key] = processor
        return processor(output_token_ids, logits)


class ThinkingGate:
    """Applies `inner` only to the answer after the thinking block."""

    def __init__(self, inner: LogitsProcessor, phase: ThinkingPhase, think_start: int | None,
                 think_end: int | None) -> None:
        if think_start is None or think_end is None:
            phase = ThinkingPhase.ANSWER
        self.inner = inner
        self.phase = phase
        self.think_start = think_start
        self.think_end = think_end
        self._scanned = 0  # output tokens already searched for `</think>`
        self._answer_start: int | None = 0 if phase is ThinkingPhase.ANSWER else None

    def __call__(self, output_token_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        start = self._find_answer_start(output_token_ids)
        if start is not None:
            return self.inner(output_token_ids[start:], logits)
        if self.phase is ThinkingPhase.MAY_THINK and not output_token_ids:
            allowed = self.inner([], logits.clone())
            allowed[self.think_start] = logits[self.think_start]  # or open the think block
            return allowed
        return logits  # thinking: free

    def _find_answer_start(self, out: list[int]) -> int | None:
        if self._answer_start is not None:
            return self._answer_start
        if self.phase is ThinkingPhase.MAY_THINK:
            if not out:
                return None
            if out[0] != self.think_start:
                self._answer_start = 0
                return 0
            self._scanned = max(self._scanned, 1)
        for i in range(self._scanned, len(out)):
            if out[i] == self.think_end:
                self._answer_start = i + 1
                return i + 1
        self._scanned = len(out)
        return None


class ForcedPrefix:
    """Forces a fixed token sequence, then hands the rest to `inner`."""

    def __init__(self, prefix: list[int], inner: LogitsProcessor) -> None:
        self.prefix = prefix
        self.inner = inner

    def __call__(self, output_token_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        n = len(output_token_ids)
        if n < len(self.prefix):
            forced = torch.full_like(logits, float("-inf"))
            forced[self.prefix[n]] = 0.0
            return forced
        return self.inner(output_token_ids[len(self.prefix):], logits)


def forced_tool_schema(request: ChatCompletionRequest) -> dict[str, Any] | None:
    """The JSON schema a forced call must match, or None when tool_choice does not force one."""
    choice = request.tool_choice
    tools = request.tools or []
    if choice is None or choice in ("auto", "none"):
        return None
    if not tools:
        raise bad_request("tool_choice requires tools", param="tool_choice")
    if isinstance(choice, NamedToolChoice):
        tools = [t for t in tools if t.function.name == choice.function.name]
        if not tools:
            raise bad_request(f"tool_choice names '{choice.function.name}', which is not among the tools",
                              param="tool_choice")

    def call_schema(name: str, parameters: dict[str, Any] | None) -> dict[str, Any]:
        return {"type": "object", "properties": {"name": {"const": name},
                                                 "arguments": parameters or {"type": "object"}},
                "required": ["name", "arguments"], "additionalProperties": False}

    options = [call_schema(t.function.name, t.function.parameters) for t in tools]
    return options[0] if len(options) == 1 else {"anyOf": options}


def _json_processor(tokenizer: Tokenizer, response_format: dict[str, Any]) -> LogitsProcessor:
    try:
        from qwenstack.serving.structured import make_json_processor
    except ImportError as exc:
        raise APIError(501, f"structured output is not available in this installation: {exc}") from None
    try:
        return make_json_processor(tokenizer, response_format)
    except (ValueError, TypeError, RuntimeError) as exc:  # an unusable schema is the request's fault
        raise bad_request(f"response_format: {exc}", param="response_format") from None


def _budget_processor(tokenizer: Tokenizer, budget: int) -> LogitsProcessor:
    try:
        from qwenstack.serving.thinking import make_thinking_budget_processor
    except ImportError as exc:
        raise APIError(501, f"a thinking budget is not available in this installation: {exc}") from None
    return make_thinking_budget_processor(tokenizer, budget)


def build_processors(tokenizer: Tokenizer, request: ChatCompletionRequest, phase: ThinkingPhase,
                     tools_rendered: bool) -> list[LogitsProcessor]:
    """The processors a chat request needs, in order: thinking budget first, then the answer grammar."""
    processors: list[LogitsProcessor] = []
    budget = request.thinking_budget_tokens
    if budget is not None and phase is not ThinkingPhase.ANSWER:
        processors.append(PerSequence(_budget_processor(tokenizer, budget),
                                      lambda: _budget_processor(tokenizer, budget)))
    think_start, think_end = tokenizer.token_to_id(THINK_START), tokenizer.token_to_id(THINK_END)
    schema = forced_tool_schema(request) if tools_rendered else None
    if schema is not None:
        call_start = tokenizer.token_to_id(TOOL_CALL_START)
        if call_start is None:
            raise bad_request("this model's tokenizer has no <tool_call> token, so a tool call cannot be forced",
                              param="tool_choice")
        prefix = [call_start] + tokenizer.encode("\n")
        fmt = {"type": "json_schema", "json_schema": {"name": "tool_call", "schema": schema}}

        def make_forced() -> LogitsProcessor:
            return ThinkingGate(ForcedPrefix(prefix, _json_processor(tokenizer, fmt)), phase, think_start, think_end)

        processors.append(PerSequence(make_forced(), make_forced))
    elif request.response_format is not None and request.response_format.type != "text":
        fmt = request.response_format.model_dump(by_alias=True, exclude_none=True)

        def make_json() -> LogitsProcessor:
            return ThinkingGate(_json_processor(tokenizer, fmt), phase, think_start, think_end)

        processors.append(PerSequence(make_json(), make_json))
    return processors
