"""The Responses event state machine: output items built from parsed model deltas, each change an event.

    builder = OutputBuilder()
    builder.reasoning("Let me think")   -> [output_item.added, content_part.added, reasoning_text.delta]
    builder.text("Hello")               -> [reasoning_text.done, content_part.done, output_item.done, ...added]
    builder.close_text()                -> the open item's done events

With `summary` (the request's reasoning.summary) a reasoning item also carries its text as a summary part, with
the reasoning_summary_part / reasoning_summary_text events beside the reasoning_text ones.

Every event is a dict with `type`; `EventLog` numbers them (`sequence_number`) in the order the client gets
them. Items get their final shape at `output_item.done` and are what the response's `output` holds, so the
streamed events always reassemble to the non-streamed response.
"""
from __future__ import annotations

import uuid
from typing import Any

Event = dict[str, Any]


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class EventLog:
    def __init__(self) -> None:
        self.sequence = 0

    def number(self, event: Event) -> Event:
        event["sequence_number"] = self.sequence
        self.sequence += 1
        return event


class OutputBuilder:
    """Output items of one response, across all its model turns."""

    def __init__(self, output: list[dict[str, Any]] | None = None, summary: bool = False) -> None:
        self.output: list[dict[str, Any]] = output if output is not None else []
        self._open: dict[str, Any] | None = None  # the reasoning or message item receiving text
        # reasoning.summary asked for: the thinking is also the reasoning item's summary, with OpenAI's summary
        # events (there is no summariser; clients such as the AI SDK read reasoning from summaries only).
        self.summary = summary

    # --- items with text -------------------------------------------------------------------------------

    def _start_text_item(self, kind: str) -> list[Event]:
        events = self.close_text()
        if kind == "reasoning":
            item: dict[str, Any] = {"id": new_id("rs"), "type": "reasoning", "summary": [], "content": [],
                                    "status": "in_progress"}
            part: dict[str, Any] = {"type": "reasoning_text", "text": ""}
        else:
            item = {"id": new_id("msg"), "type": "message", "role": "assistant", "status": "in_progress",
                    "content": []}
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        index = len(self.output)
        self.output.append(item)
        self._open = {"item": item, "index": index, "part": part}
        events.append({"type": "response.output_item.added", "output_index": index, "item": _copy(item)})
        events.append({"type": "response.content_part.added", "item_id": item["id"], "output_index": index,
                       "content_index": 0, "part": dict(part)})
        item["content"].append(part)
        if kind == "reasoning" and self.summary:
            summary = {"type": "summary_text", "text": ""}
            events.append({"type": "response.reasoning_summary_part.added", "item_id": item["id"],
                           "output_index": index, "summary_index": 0, "part": dict(summary)})
            item["summary"].append(summary)
            self._open["summary"] = summary
        return events

    def _append(self, kind: str, delta: str, logprobs: list[dict[str, Any]]) -> list[Event]:
        events: list[Event] = []
        if self._open is None or self._open["item"]["type"] != kind:
            events += self._start_text_item(kind)
        assert self._open is not None
        part = self._open["part"]
        part["text"] += delta
        event = {"type": "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta",
                 "item_id": self._open["item"]["id"], "output_index": self._open["index"], "content_index": 0,
                 "delta": delta}
        if kind == "message":
            event["logprobs"] = logprobs
            part["logprobs"] = part["logprobs"] + logprobs  # a new list: events already made keep theirs
        events.append(event)
        summary = self._open.get("summary")
        if summary is not None:
            summary["text"] += delta
            events.append({"type": "response.reasoning_summary_text.delta", "item_id": event["item_id"],
                           "output_index": event["output_index"], "summary_index": 0, "delta": delta})
        return events

    @property
    def answering(self) -> bool:
        """Whether an answer (message) item is open and receiving text."""
        return self._open is not None and self._open["item"]["type"] == "message"

    def reasoning(self, delta: str) -> list[Event]:
        return self._append("reasoning", delta, []) if delta else []

    def text(self, delta: str, logprobs: list[dict[str, Any]] | None = None) -> list[Event]:
        """Answer text; `logprobs` (chat's shape, serving/logprobs.py) of the tokens that wrote it."""
        return self._append("message", delta, logprobs or []) if delta else []

    def close_text(self, status: str = "completed") -> list[Event]:
        """The open text item's done events; `status` "incomplete" for a text cut off (max_output_tokens, the guard)."""
        if self._open is None:
            return []
        item, index, part, summary = (self._open["item"], self._open["index"], self._open["part"],
                                      self._open.get("summary"))
        self._open = None
        item["status"] = status
        base = {"item_id": item["id"], "output_index": index, "content_index": 0}
        if item["type"] == "reasoning":
            done: list[Event] = [{"type": "response.reasoning_text.done", **base, "text": part["text"]}]
        else:
            done = [{"type": "response.output_text.done", **base, "text": part["text"], "logprobs": part["logprobs"]}]
        if summary is not None:
            at = {"item_id": item["id"], "output_index": index, "summary_index": 0}
            done += [{"type": "response.reasoning_summary_text.done", **at, "text": summary["text"]},
                     {"type": "response.reasoning_summary_part.done", **at, "part": dict(summary)}]
        return done + [{"type": "response.content_part.done", **base, "part": dict(part)},
                       {"type": "response.output_item.done", "output_index": index, "item": _copy(item)}]

    # --- tool calls --------------------------------------------------------------------------------------

    def add_item(self, item: dict[str, Any]) -> tuple[int, list[Event]]:
        """A whole item (a tool listing, an approval request...) or the start of a call: its added event."""
        events = self.close_text()
        index = len(self.output)
        self.output.append(item)
        events.append({"type": "response.output_item.added", "output_index": index, "item": _copy(item)})
        return index, events

    def done_item(self, index: int) -> list[Event]:
        return [{"type": "response.output_item.done", "output_index": index, "item": _copy(self.output[index])}]

    def function_call_started(self, call_id: str, name: str) -> tuple[int, list[Event]]:
        """A client function call the model has begun: its arguments follow (function_call_arguments)."""
        return self.add_item({"id": new_id("fc"), "type": "function_call", "call_id": call_id, "name": name,
                              "arguments": "", "status": "in_progress"})

    def function_call_arguments(self, index: int, delta: str) -> list[Event]:
        item = self.output[index]
        item["arguments"] += delta
        return [{"type": "response.function_call_arguments.delta", "item_id": item["id"], "output_index": index,
                 "delta": delta}]

    def function_call_done(self, index: int, status: str = "completed") -> list[Event]:
        item = self.output[index]
        item["status"] = status
        return [{"type": "response.function_call_arguments.done", "item_id": item["id"], "output_index": index,
                 "name": item["name"], "arguments": item["arguments"]}] + self.done_item(index)

    def function_call(self, call_id: str, name: str, arguments: str) -> list[Event]:
        """A whole client function call (one arguments delta)."""
        index, events = self.function_call_started(call_id, name)
        return events + self.function_call_arguments(index, arguments) + self.function_call_done(index)

    def mcp_call_started(self, label: str, name: str, arguments: str,
                         approval_request_id: str | None = None) -> tuple[int, list[Event]]:
        item = {"id": new_id("mcp"), "type": "mcp_call", "server_label": label, "name": name, "arguments": "",
                "output": None, "error": None, "status": "in_progress"}
        if approval_request_id is not None:
            item["approval_request_id"] = approval_request_id
        index, events = self.add_item(item)
        base = {"item_id": item["id"], "output_index": index}
        item["arguments"] = arguments
        events.append({"type": "response.mcp_call_arguments.delta", **base, "delta": arguments})
        events.append({"type": "response.mcp_call_arguments.done", **base, "arguments": arguments})
        events.append({"type": "response.mcp_call.in_progress", **base})
        return index, events

    def mcp_call_finished(self, index: int, output: str | None, error: dict[str, Any] | None) -> list[Event]:
        item = self.output[index]
        item.update(output=output, error=error, status="completed" if error is None else "failed")
        kind = "response.mcp_call.completed" if error is None else "response.mcp_call.failed"
        return [{"type": kind, "item_id": item["id"], "output_index": index}] + self.done_item(index)


def _copy(item: dict[str, Any]) -> dict[str, Any]:
    """A snapshot of an item as it is now (later changes must not alter an event already made)."""
    out = dict(item)
    for key in ("content", "summary"):
        if isinstance(out.get(key), list):
            out[key] = [dict(p) for p in out[key]]
    return out
