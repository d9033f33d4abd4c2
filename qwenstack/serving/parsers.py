"""Split a Qwen3 model's generated text into reasoning, content and tool calls.

One incremental parser (`ChatOutputParser`) serves both streaming and non-streaming
use; `parse_chat_output` just feeds it the whole text, so the two paths cannot disagree.
Pure Python: no torch; from qwenstack only json_stream.py (streamed arguments).

Design decisions:
- A small state machine over text (CONTENT, REASONING, TOOL_CALL). Only the tags that
  mean something in the current state are searched for; any buffer suffix that could
  be the start of one of them is held back until the next feed disambiguates it, so a
  tag split across deltas (`<thi` + `nk>`) is never emitted as text.
- Reasoning: `<think>` opens it at most once, and only before the think block closed,
  before any tool call and before any answer text (a grammar lets a JSON answer's
  strings hold the tag); `starts_in_reasoning` covers templates that pre-fill
  `<think>\\n`. One newline after `<think>` and one before `</think>` are dropped, as
  are up to two newlines after `</think>`. A `<tool_call>` inside reasoning is text.
  With thinking off (`thinking=False`: the template closed an empty block, or the
  client disabled it) `<think>` is text: an answer that writes one stays an answer.
  An unclosed `<think>` makes the rest reasoning. A `</think>` seen while not
  reasoning is left in content: it is visible evidence of a misconfigured
  `starts_in_reasoning` rather than something to hide.
- Tool calls (only with `tools_enabled`; with `bound_answer`, a format binding the
  answer, only before its text, as its grammar allows): a block is buffered whole until
  `</tool_call>` (or `finish()`; a `</tool_call>` inside one of a JSON body's strings
  is part of that string, as a grammar-forced call may write it), then parsed; the
  format is chosen per block (body starting with `<function=` is Qwen3-Coder XML,
  otherwise Hermes JSON). A closed block that does not parse goes back to content
  verbatim, tags included, with a warning logged on "qwenstack.parsers"; nothing raises
  on model output. A block the output ended inside
  (max_tokens) is a call as far as it got once its name is whole (its arguments cut, as
  OpenAI reports a call cut by the limit), and dropped before that: it is only markup.
- Whitespace: trailing content whitespace is held back until we know what follows, so
  whitespace next to a tool call (before, between, after) is dropped, as is
  whitespace-only text before `<think>`. Other whitespace is kept.
- Streamed tool calls are emitted whole once the block is closed: one delta with
  index, id, type and name (arguments ""), then one with the arguments string. A
  client concatenating fragments by index rebuilds exactly the non-streamed call.
- With `stream_arguments` (the Responses API asks for it), a Hermes JSON call is
  announced as soon as `{"name": ..., "arguments":` has arrived and its arguments
  follow as they are generated, rewritten by json_stream.JsonRewriter into the form
  the whole call would get (so the fragments add up to the same string). An
  announced call stays a call: if its block then turns out malformed, it keeps the
  arguments sent so far (a warning is logged) instead of going back to content.
"""

from __future__ import annotations

import ast
import enum
import json
import logging
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from qwenstack.markup import THINK_END, THINK_START, TOOL_CALL_END, TOOL_CALL_START
from qwenstack.serving.json_stream import JsonRewriter

logger = logging.getLogger("qwenstack.parsers")



@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON string, as the OpenAI API carries it
    index: int
    type: str = "function"


@dataclass
class ToolCallDelta:
    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""  # a fragment to append to this index's arguments
    type: str | None = None  # "function" on the first fragment only


@dataclass
class ParsedDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not (self.reasoning or self.content or self.tool_calls)


@dataclass
class ParsedMessage:
    reasoning: str | None
    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)


class _State(enum.Enum):
    CONTENT = "content"
    REASONING = "reasoning"
    TOOL_CALL = "tool_call"


# The start of a Hermes JSON call, up to where its arguments value begins.
_NAME_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"')
_CALL_HEAD = re.compile(
    r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:'
)


@dataclass
class _StreamedCall:
    index: int
    rewriter: JsonRewriter
    fed: int  # how much of the call body the rewriter has seen
    sent: str = ""  # the argument fragments emitted so far


def new_tool_call_id() -> str:
    return "call_" + secrets.token_hex(12)  # 24 hex chars


class ChatOutputParser:
    """Feed generated text deltas; get back `ParsedDelta`s. Call `finish()` at the end."""

    def __init__(
        self,
        *,
        starts_in_reasoning: bool = False,
        thinking: bool = True,
        tools_enabled: bool = False,
        tool_schemas: Sequence[Mapping[str, Any]] | None = None,
        stream_arguments: bool = False,
        bound_answer: bool = False,
    ) -> None:
        self._tools_enabled = tools_enabled
        self._bound_answer = bound_answer  # a format binds the answer: a call never follows its text
        self._stream_arguments = stream_arguments
        self._streamed: _StreamedCall | None = None  # the call being streamed, once announced
        self._param_types = _param_types_by_tool(tool_schemas)
        self._state = _State.REASONING if starts_in_reasoning else _State.CONTENT
        # `<think>` may still open a block: not once one was opened, nor when thinking is off (then it is text).
        self._think_allowed = thinking and not starts_in_reasoning
        self._buf = ""  # received but not yet processed (a possible tag prefix)
        self._call_body = ""
        self._call_count = 0
        # Newlines still to drop at the start of the next reasoning/content text.
        self._skip_newlines = 1 if starts_in_reasoning else 0
        self._pending_ws = ""  # trailing content whitespace, held back
        self._drop_leading_ws = False  # set after a tool call
        self._content_emitted = False
        self._finished = False
        self._out = ParsedDelta()

    def feed(self, text: str) -> ParsedDelta:
        if self._finished:
            raise RuntimeError("ChatOutputParser.feed() called after finish()")
        self._buf += text
        self._process(final=False)
        return self._take()

    def feed_output(self, text: str, finished: bool) -> ParsedDelta:
        """One engine output's delta: its new text, and with `finished` everything held back too."""
        parsed = self.feed(text) if text else ParsedDelta()
        if finished:
            rest = self.finish()
            parsed = ParsedDelta(parsed.reasoning + rest.reasoning, parsed.content + rest.content,
                                 parsed.tool_calls + rest.tool_calls)
        return parsed

    def finish(self) -> ParsedDelta:
        """Flush everything held back; an open think block or tool call ends here."""
        if self._finished:
            return ParsedDelta()
        self._finished = True
        self._process(final=True)
        if self._state is _State.TOOL_CALL:
            self._close_tool_call(terminated=False)
        if self._call_count == 0:  # whitespace is only dropped next to tool calls
            self._out.content += self._pending_ws
        self._pending_ws = ""
        return self._take()

    # -- scanning ----------------------------------------------------------------

    def _active_tags(self) -> list[str]:
        if self._state is _State.REASONING:
            return [THINK_END]
        if self._state is _State.TOOL_CALL:
            return [TOOL_CALL_END]
        # Thinking comes first (Qwen3 thinks before it answers): once answer text is out, `<think>` is text.
        tags = [THINK_START] if self._think_allowed and not self._content_emitted else []
        if self._tools_enabled and not (self._bound_answer and self._content_emitted):
            tags.append(TOOL_CALL_START)
        return tags

    def _process(self, final: bool) -> None:
        while True:
            tags = self._active_tags()
            found = [(self._buf.find(t), t) for t in tags]
            found = [(pos, t) for pos, t in found if pos >= 0]
            if found:
                pos, tag = min(found)
                before, self._buf = self._buf[:pos], self._buf[pos + len(tag) :]
                if tag == TOOL_CALL_END and _inside_json_string(self._call_body + before):
                    self._on_text(before + tag)  # an argument's text, not the call's end
                    continue
                if tag == THINK_END and before.endswith("\n"):
                    before = before[:-1]  # the newline before `</think>` is template
                self._on_text(before)
                if tag in self._active_tags():
                    self._on_tag(tag)
                else:  # the answer text just before it made it text (see _active_tags)
                    self._on_text(tag)
                continue
            if final:
                text, self._buf = self._buf, ""
            else:
                keep = _partial_tag_len(self._buf, tags)
                cut = len(self._buf) - keep
                # Hold a newline that may turn out to precede `</think>`.
                if self._state is _State.REASONING and cut > 0 and self._buf[cut - 1] == "\n":
                    cut -= 1
                text, self._buf = self._buf[:cut], self._buf[cut:]
            self._on_text(text)
            return

    def _on_text(self, text: str) -> None:
        if not text:
            return
        if self._state is _State.TOOL_CALL:
            self._call_body += text
            if self._stream_arguments:
                self._stream_call()
        elif self._state is _State.REASONING:
            self._out.reasoning += self._strip_skipped_newlines(text)
        else:
            self._emit_content(text)

    def _on_tag(self, tag: str) -> None:
        if tag == THINK_START:
            self._state = _State.REASONING
            self._think_allowed = False
            self._skip_newlines = 1
            if not self._content_emitted:
                self._pending_ws = ""  # whitespace before `<think>` is not an answer
        elif tag == THINK_END:
            self._state = _State.CONTENT
            self._skip_newlines = 2  # the template's "\n\n" after `</think>`
        elif tag == TOOL_CALL_START:
            self._state = _State.TOOL_CALL
            self._think_allowed = False  # reasoning does not follow a call
            self._call_body = ""
        elif tag == TOOL_CALL_END:
            self._close_tool_call(terminated=True)

    # -- output ------------------------------------------------------------------

    def _strip_skipped_newlines(self, text: str) -> str:
        while self._skip_newlines and text.startswith("\n"):
            text = text[1:]
            self._skip_newlines -= 1
        if text:
            self._skip_newlines = 0
        return text

    def _emit_content(self, text: str) -> None:
        text = self._strip_skipped_newlines(text)
        if self._drop_leading_ws:
            text = text.lstrip()
            if not text:
                return
            self._drop_leading_ws = False
        text = self._pending_ws + text
        body = text.rstrip()
        # Trailing whitespace waits: if a tool call follows, it is dropped.
        self._pending_ws = text[len(body) :]
        if body:
            self._out.content += body
            self._content_emitted = True

    def _stream_call(self) -> None:
        call = self._streamed
        if call is None:
            head = _CALL_HEAD.match(self._call_body)
            if head is None:
                return
            try:
                name = json.loads('"' + head.group(1) + '"')
            except ValueError:
                return
            if not name:
                return
            call = self._streamed = _StreamedCall(self._call_count, JsonRewriter(), head.end())
            self._call_count += 1
            self._out.tool_calls.append(
                ToolCallDelta(index=call.index, id=new_tool_call_id(), name=name, type="function")
            )
        fragment = call.rewriter.feed(self._call_body[call.fed :])
        call.fed = len(self._call_body)
        if fragment:
            call.sent += fragment
            self._out.tool_calls.append(ToolCallDelta(index=call.index, arguments=fragment))

    def _close_tool_call(self, terminated: bool) -> None:
        self._state = _State.CONTENT
        body, self._call_body = self._call_body, ""
        parsed = _parse_tool_call_body(body, self._param_types)
        call, self._streamed = self._streamed, None
        if call is not None:  # announced already: send what the arguments still lack
            self._pending_ws = ""
            self._drop_leading_ws = True
            final = parsed[1] if parsed is not None else None
            if final is not None and final.startswith(call.sent):
                if final[len(call.sent) :]:
                    self._out.tool_calls.append(
                        ToolCallDelta(index=call.index, arguments=final[len(call.sent) :])
                    )
            else:
                logger.warning(
                    "a streamed tool call ended unlike it began; its arguments stay as sent: %.200r", body
                )
            return
        if parsed is None and not terminated:
            # The output ended inside the call (max_tokens): OpenAI's shape for it is the call as far as it
            # got, its arguments cut, and before the name is whole there is nothing to report but markup.
            parsed = _cut_json_call(body)
            logger.warning("a tool call cut off %s: %.200r", "kept as far as it got" if parsed else "dropped", body)
            if parsed is None:
                self._pending_ws = ""
                return
        if parsed is None:
            block = TOOL_CALL_START + body + TOOL_CALL_END
            logger.warning("malformed tool call returned as content: %.200r", block)
            self._emit_content(block)
            return
        name, arguments = parsed
        index = self._call_count
        self._call_count += 1
        self._pending_ws = ""
        self._drop_leading_ws = True
        self._out.tool_calls.append(
            ToolCallDelta(index=index, id=new_tool_call_id(), name=name, type="function")
        )
        if arguments:
            self._out.tool_calls.append(ToolCallDelta(index=index, arguments=arguments))

    def _take(self) -> ParsedDelta:
        out, self._out = self._out, ParsedDelta()
        return out


def _inside_json_string(body: str) -> bool:
    """Whether a Hermes JSON call body ends inside one of its strings (where `</tool_call>` is text: a grammar-forced
    call may write it in an argument, and the JSON around it is whole only with it)."""
    if not body.lstrip().startswith("{"):
        return False
    inside = escaped = False
    for char in body:
        if escaped:
            escaped = False
        elif char == "\\" and inside:
            escaped = True
        elif char == '"':
            inside = not inside
    return inside


def _partial_tag_len(buf: str, tags: list[str]) -> int:
    """Length of the longest suffix of `buf` that is a proper prefix of a tag."""
    best = 0
    for tag in tags:
        for k in range(min(len(buf), len(tag) - 1), best, -1):
            if buf.endswith(tag[:k]):
                best = k
                break
    return best


# -- tool call bodies ------------------------------------------------------------

_FUNCTION_RE = re.compile(r"<function=([^>\n]*)>(.*?)(?:</function>|$)", re.DOTALL)
# A missing `</parameter>` is tolerated: the next parameter or the end closes it.
_PARAMETER_RE = re.compile(
    r"<parameter=([^>\n]*)>(.*?)(?:</parameter>|(?=<parameter=)|$)", re.DOTALL
)
_CONVERTED_TYPES = {"integer", "number", "boolean", "object", "array"}


def _parse_tool_call_body(
    body: str, param_types: dict[str, dict[str, str]]
) -> tuple[str, str] | None:
    """Returns (name, arguments JSON string), or None when the body is malformed."""
    stripped = body.strip()
    if stripped.startswith("<function="):
        return _parse_xml_call(stripped, param_types)
    return _parse_json_call(stripped)


def _parse_json_call(body: str) -> tuple[str, str] | None:
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return None
    # Some fine-tunes say "parameters"; a missing or null value means no arguments.
    args = obj.get("arguments", obj.get("parameters"))
    if args is None:
        return name, "{}"
    if isinstance(args, str):
        return name, args
    return name, json.dumps(args, ensure_ascii=False)


def _cut_json_call(body: str) -> tuple[str, str] | None:
    """(name, the arguments as far as they got) of a Hermes JSON call cut off after its name, else None."""
    head = _NAME_HEAD.match(body)
    if head is None:
        return None
    try:
        name = json.loads('"' + head.group(1) + '"')
    except ValueError:
        return None
    arguments = _CALL_HEAD.match(body)
    return (name, body[arguments.end():].strip() if arguments else "") if name else None


def _parse_xml_call(
    body: str, param_types: dict[str, dict[str, str]]
) -> tuple[str, str] | None:
    match = _FUNCTION_RE.search(body)
    if match is None or not match.group(1).strip():
        return None
    name = match.group(1).strip()
    types = param_types.get(name, {})
    args: dict[str, Any] = {}
    for pmatch in _PARAMETER_RE.finditer(match.group(2)):
        key = pmatch.group(1).strip()
        raw = _strip_one_newline(pmatch.group(2))
        args[key] = _convert_param(raw, types[key]) if key in types else raw
    return name, json.dumps(args, ensure_ascii=False)


def _strip_one_newline(value: str) -> str:
    if value.startswith("\n"):
        value = value[1:]
    if value.endswith("\n"):
        value = value[:-1]
    return value


def _convert_param(raw: str, json_type: str) -> Any:
    """Raw XML parameter text -> a Python value, by the parameter's JSON-schema type."""
    if raw.strip().lower() == "null":
        return None
    if json_type not in _CONVERTED_TYPES:
        return raw
    for loads in (json.loads, ast.literal_eval):
        try:
            value = loads(raw.strip())
            # literal_eval can yield sets, bytes, complex: keep only what JSON can carry.
            json.dumps(value, allow_nan=False)
            return value
        except Exception:  # any failure falls through to the next reading
            continue
    return raw


def _param_types_by_tool(
    tool_schemas: Sequence[Mapping[str, Any]] | None,
) -> dict[str, dict[str, str]]:
    """{tool name: {parameter: JSON type}} from OpenAI `tools` entries or bare functions."""
    result: dict[str, dict[str, str]] = {}
    for tool in tool_schemas or ():
        if not isinstance(tool, Mapping):
            continue
        fn = tool.get("function", tool)
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            continue
        params = fn.get("parameters") or {}
        props = params.get("properties") if isinstance(params, Mapping) else None
        types: dict[str, str] = {}
        for key, schema in (props or {}).items():
            json_type = _schema_type(schema)
            if json_type:
                types[key] = json_type
        result[fn["name"]] = types
    return result


def _schema_type(schema: Any) -> str | None:
    """The first non-null type of a property schema (`type` list, anyOf/oneOf)."""
    if not isinstance(schema, Mapping):
        return None
    json_type = schema.get("type")
    if isinstance(json_type, str):
        return json_type
    if isinstance(json_type, list):
        return next((t for t in json_type if isinstance(t, str) and t != "null"), None)
    for option in schema.get("anyOf", schema.get("oneOf", [])) or []:
        found = _schema_type(option)
        if found and found != "null":
            return found
    return None


# -- whole messages --------------------------------------------------------------


class MessageAccumulator:
    """Concatenates `ParsedDelta`s into a `ParsedMessage` (tool calls joined by index)."""

    def __init__(self) -> None:
        self._reasoning: list[str] = []
        self._content: list[str] = []
        self._calls: dict[int, ToolCall] = {}

    def add(self, delta: ParsedDelta) -> None:
        self._reasoning.append(delta.reasoning)
        self._content.append(delta.content)
        for d in delta.tool_calls:
            call = self._calls.setdefault(d.index, ToolCall("", "", "", d.index))
            call.id = d.id or call.id
            call.name = d.name or call.name
            call.type = d.type or call.type
            call.arguments += d.arguments

    def message(self) -> ParsedMessage:
        return ParsedMessage(
            reasoning="".join(self._reasoning) or None,
            content="".join(self._content) or None,
            tool_calls=[self._calls[i] for i in sorted(self._calls)],
        )


def parse_chat_output(
    text: str,
    *,
    starts_in_reasoning: bool = False,
    thinking: bool = True,
    tools_enabled: bool = False,
    tool_schemas: Sequence[Mapping[str, Any]] | None = None,
    bound_answer: bool = False,
) -> ParsedMessage:
    """Non-streaming parse, through the streaming parser so both always agree."""
    parser = ChatOutputParser(
        starts_in_reasoning=starts_in_reasoning,
        thinking=thinking,
        bound_answer=bound_answer,
        tools_enabled=tools_enabled,
        tool_schemas=tool_schemas,
    )
    acc = MessageAccumulator()
    acc.add(parser.feed(text))
    acc.add(parser.finish())
    return acc.message()


def finish_reason_for(message: ParsedMessage, engine_finish_reason: str) -> str:
    """OpenAI reports "tool_calls" when a normally stopped turn made calls."""
    if message.tool_calls and engine_finish_reason == "stop":
        return "tool_calls"
    return engine_finish_reason
