"""The logits processors a chat request needs: the thinking budget, then structured output (response_format)
or a forced tool call (tool_choice "required" or a named function).

Decisions:
- The grammars come from `qwenstack.engine.grammar` (llguidance) and the budget from
  `qwenstack.engine.thinking_budget`; both are imported only when a request asks for them, so the server starts
  without paying for llguidance. Invalid schemas or tool choices raise RequestError there (a 400 here).
- The grammar applies to the answer, not to the thinking: the processors are told whether the model may
  open a think block (thinking on, Qwen3 templates up to 2507) or starts inside one (the prompt ends with
  `<think>\\n`), as vLLM applies grammars after the reasoning.
- Order matters: the budget first (it may force `</think>`), the grammar second (its grammar allows the
  forced close).
- The engine gives each of a request's n samples the same processor objects, and these processors keep
  per-sequence state; `PerSequence` keeps one instance per sequence, keyed by the sequence's own output
  list (which lives as long as the sequence).
"""
from __future__ import annotations

import enum
from typing import Any, Callable

import torch

from qwenstack.engine.params import LogitsProcessor, ReasoningMarkers
from qwenstack.markup import THINK_END, THINK_START
from qwenstack.serving.errors import APIError
from qwenstack.serving.protocol import ChatCompletionRequest, NamedToolChoice
from qwenstack.tokenizer import Tokenizer



class ThinkingPhase(enum.Enum):
    MAY_THINK = "may_think"  # thinking on, the model opens the block itself
    THINKING = "thinking"  # the prompt already opened the block (`<think>\n` at its end)
    ANSWER = "answer"  # thinking off: the output is the answer from its first token

    @property
    def thinking(self) -> bool:
        return self is not ThinkingPhase.ANSWER

    @property
    def starts_in_reasoning(self) -> bool:
        return self is ThinkingPhase.THINKING

    def markers(self) -> ReasoningMarkers | None:
        """What the engine needs to keep stop strings out of the think block (None: no block)."""
        return ReasoningMarkers(THINK_START, THINK_END, opened=self.starts_in_reasoning) if self.thinking else None


class PerSequence:
    """One processor instance per sequence of a request (the n samples share the request's list)."""

    def __init__(self, factory: Callable[[], LogitsProcessor]) -> None:
        self._factory = factory
        self._first: LogitsProcessor | None = factory()  # built now, so a bad request fails before it runs
        self._by_seq: dict[int, LogitsProcessor] = {}

    def __call__(self, output_token_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        key = id(output_token_ids)
        processor = self._by_seq.get(key)
        if processor is None:
            processor, self._first = (self._first or self._factory()), None
            self._by_seq[key] = processor
        return processor(output_token_ids, logits)


def _structured() -> Any:
    try:
        from qwenstack.engine import grammar as structured
    except ImportError as exc:
        raise APIError(501, f"structured output is not available in this installation: {exc}") from None
    return structured


def _thinking() -> Any:
    try:
        from qwenstack.engine import thinking_budget as thinking
    except ImportError as exc:
        raise APIError(501, f"a thinking budget is not available in this installation: {exc}") from None
    return thinking


def forces_tool_call(request: ChatCompletionRequest) -> bool:
    return request.tool_choice == "required" or isinstance(request.tool_choice, NamedToolChoice)


def build_processors(tokenizer: Tokenizer, request: ChatCompletionRequest, phase: ThinkingPhase,
                     tools: list[dict[str, Any]] | None) -> list[LogitsProcessor]:
    """`tools` are the rendered tools (None when tool_choice is "none" or there are none)."""
    processors: list[LogitsProcessor] = []
    budget = request.thinking_budget_tokens
    if budget is not None and phase.thinking:
        thinking = _thinking()
        processors.append(PerSequence(lambda: thinking.make_thinking_budget_processor(
            tokenizer, budget, phase.starts_in_reasoning)))
    grammar_options = {"thinking": phase.thinking, "starts_in_reasoning": phase.starts_in_reasoning,
                       "whitespace_pattern": request.guided_whitespace_pattern}
    if tools and forces_tool_call(request):
        structured = _structured()
        choice = request.tool_choice
        choice_value = choice.model_dump() if isinstance(choice, NamedToolChoice) else choice
        parallel = request.parallel_tool_calls is not False  # OpenAI's default is true
        processors.append(PerSequence(lambda: structured.make_tool_call_processor(
            tokenizer, tools, choice_value, parallel_tool_calls=parallel, **grammar_options)))
    elif request.response_format is not None and request.response_format.type != "text":
        structured = _structured()
        fmt = request.response_format.model_dump(by_alias=True, exclude_none=True)
        processors.append(PerSequence(lambda: structured.make_json_processor(tokenizer, fmt, **grammar_options)))
    return processors
