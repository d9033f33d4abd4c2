"""The logits processors a request needs: the thinking budget, then structured output (the answer's format) or
a forced tool call (tool_choice "required" or a named function).

Decisions:
- The grammars come from `qwenstack.engine.grammar` (llguidance) and the budget from
  `qwenstack.engine.thinking_budget`; both are imported only when a request asks for them, so the server starts
  without paying for llguidance. Invalid schemas or tool choices raise RequestError there (a 400 here).
- The grammar applies to the answer, not to the thinking: the processors are told whether the model may
  open a think block (thinking on, Qwen3 templates up to 2507) or starts inside one (the prompt ends with
  `<think>\\n`), as vLLM applies grammars after the reasoning.
- The answer's format comes in any of the spellings clients send (protocol._SamplingFields): OpenAI's
  response_format, vLLM's structured_outputs and guided_* fields, llama.cpp's grammar and json_schema. A
  request names one; two (even equal ones) are a 400, as in vLLM, rather than a silent pick. A forced tool call
  wins over the answer's format, which then applies to nothing (the output is the call). With tool_choice auto
  and a format, the output is tool calls or an answer in the format, as OpenAI's API lets the model choose
  (vLLM's format rules the calls out).
- Order matters: the budget first (it may force `</think>`), the grammar second (its grammar allows the
  forced close).
- The processors are built here, so that a bad schema or tool choice is a 400 before the request runs; they
  keep per-sequence state, and the engine forks each sequence its own (LogitsProcessor.fork).
"""
from __future__ import annotations

import enum
from typing import Any

from qwenstack.engine.params import LogitsProcessor, ReasoningMarkers
from qwenstack.markup import THINK_END, THINK_START
from qwenstack.serving.errors import APIError, bad_request
from qwenstack.serving.protocol import ChatCompletionRequest, NamedToolChoice, _SamplingFields
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


def binds_answer(request: _SamplingFields) -> bool:
    """Whether a format (response_format, a guided_* field...) binds the answer: then tool calls, if any, come
    before it (the grammar's `calls | @answer`), never inside it."""
    return bool(_given_formats(request))


def _given_formats(request: _SamplingFields) -> list[tuple[str, str, Any]]:
    """(field, kind, spec) of each answer format the request gives, as written (not yet checked)."""
    given: list[tuple[str, str, Any]] = []
    if request.response_format is not None and request.response_format.type != "text":
        given.append(("response_format", "response_format", request.response_format))
    options = request.structured_outputs
    if options is not None:
        for name, kind, value in (("json", "json_schema", options.json_), ("regex", "regex", options.regex),
                                  ("choice", "choice", options.choice), ("grammar", "grammar", options.grammar),
                                  ("json_object", "json_object", options.json_object or None)):
            if value is not None:
                given.append((f"structured_outputs.{name}", kind, value))
    for name, kind in (("guided_json", "json_schema"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                       ("guided_grammar", "grammar"), ("grammar", "grammar"), ("json_schema", "json_schema")):
        if getattr(request, name) is not None:
            given.append((name, kind, getattr(request, name)))
    return given


def _answer_constraint(request: _SamplingFields) -> tuple[str, Any] | None:
    """(the field as the client wrote it, its grammar.AnswerFormat), or None for free text. Two constraints
    are a 400."""
    given = _given_formats(request)
    if not given:
        return None
    if len(given) > 1:
        names = ", ".join(name for name, _, _ in given)
        raise bad_request(f"a request takes one structured output constraint; this one has {names}",
                          param=given[1][0])
    name, kind, spec = given[0]
    structured = _structured()
    try:
        if kind == "response_format":
            return name, structured.answer_format_of(spec.model_dump(by_alias=True, exclude_none=True))
        if kind == "json_schema":
            return name, structured.answer_format_of({"type": "json_schema", "json_schema": {"schema": spec}})
        return name, structured.AnswerFormat(kind, spec)
    except structured.StructuredOutputError as exc:
        raise bad_request(f"{name}: {exc}", param=name) from None


def _whitespace_pattern(request: _SamplingFields) -> str | None:
    options = request.structured_outputs
    if options is not None and options.whitespace_pattern is not None:
        return options.whitespace_pattern
    return request.guided_whitespace_pattern


def answer_processors(tokenizer: Tokenizer, request: _SamplingFields, phase: ThinkingPhase) -> list[LogitsProcessor]:
    """The processor that holds the answer to the request's format ([] for free text): /v1/completions' and
    raw generation's processors, and the grammar half of a chat request's."""
    constraint = _answer_constraint(request)
    if constraint is None:
        return []
    name, fmt = constraint
    structured = _structured()
    options = {"thinking": phase.thinking, "starts_in_reasoning": phase.starts_in_reasoning,
               "whitespace_pattern": _whitespace_pattern(request)}
    try:
        return [structured.make_answer_processor(tokenizer, fmt, **options)]
    except structured.StructuredOutputError as exc:
        raise bad_request(f"{name}: {exc}", param=name) from None


def build_processors(tokenizer: Tokenizer, request: ChatCompletionRequest, phase: ThinkingPhase,
                     tools: list[dict[str, Any]] | None) -> list[LogitsProcessor]:
    """`tools` are the rendered tools (None when tool_choice is "none" or there are none)."""
    processors: list[LogitsProcessor] = []
    budget = request.thinking_budget_tokens
    if budget is not None and phase.thinking:
        thinking = _thinking()
        processors.append(thinking.make_thinking_budget_processor(tokenizer, budget, phase.starts_in_reasoning))
    answer = answer_processors(tokenizer, request, phase)  # validated even when a forced tool call wins
    structured = _structured() if tools and (answer or forces_tool_call(request)) else None
    options = {"parallel_tool_calls": request.parallel_tool_calls is not False,  # OpenAI's default is true
               "thinking": phase.thinking, "starts_in_reasoning": phase.starts_in_reasoning,
               "whitespace_pattern": _whitespace_pattern(request)}
    if structured is not None and forces_tool_call(request):
        choice = request.tool_choice
        choice_value = choice.model_dump() if isinstance(choice, NamedToolChoice) else choice
        try:
            processors.append(structured.make_tool_call_processor(tokenizer, tools, choice_value, **options))
        except structured.StructuredOutputError as exc:  # name the field at fault: the choice or a tool
            raise bad_request(str(exc), param="tool_choice" if str(exc).startswith("tool_choice") else "tools") \
                from None
    elif structured is not None:  # tool_choice auto with a format: calls, or an answer in the format
        constraint = _answer_constraint(request)
        assert constraint is not None  # `answer` holds its processor
        fmt = constraint[1]
        processors.append(structured.make_tool_call_or_answer_processor(tokenizer, tools, fmt, **options))
    else:
        processors += answer
    return processors
