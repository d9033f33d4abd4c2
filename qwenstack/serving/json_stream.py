"""Rewrites a JSON object or array as its text arrives, in `json.dumps(value, ensure_ascii=False)`'s form.

    rewriter = JsonRewriter()
    rewriter.feed('{ "city" :"Par')   -> '{"city": "Par'
    rewriter.feed('is"}')             -> 'is"}'         (rewriter.done is now True)

Why: a tool call's arguments are sent to clients as `json.dumps` of the parsed value, but streaming them means
sending fragments before the value is whole. Re-serialising token by token (separators ", " and ": ",
whitespace dropped, escapes decoded and re-encoded as json.dumps writes them, numbers once they end) makes
every fragment a prefix of that final text, so the streamed fragments add up to the non-streamed arguments.

Decisions:
- Only a value that starts with `{` or `[` is rewritten; any other start (a string of arguments, null) sets
  `held`: its dumped form is not a rewrite of its text (null arguments mean "{}"), so the caller sends it whole.
- Text that is not JSON sets `broken` and nothing more is returned; the caller decides from the parsed whole.
- The one case where the prefix promise fails is an object with a repeated key (json.loads keeps the last value
  at the first key's place); the caller compares with the final text.
- Pure Python, no other imports from qwenstack.
"""
from __future__ import annotations

import json

_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_SCALAR = set("0123456789+-.eEabcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_SPACE = " \t\n\r"


def _dumped(char: str) -> str:
    return json.dumps(char, ensure_ascii=False)[1:-1]


class JsonRewriter:
    def __init__(self) -> None:
        self.stack: list[str] = []  # "{" or "[" for each open container
        self.state = "start"  # start value value_or_end key key_or_end colon comma string escape unicode scalar
        self.key = False  # the string being read is an object key
        self.scalar = ""  # a number or literal being read
        self.hex = ""  # the digits of a \\uXXXX escape being read
        self.high = ""  # a high surrogate waiting for its low half
        self.done = self.held = self.broken = False

    def feed(self, text: str) -> str:
        out: list[str] = []
        for char in text:
            if self.done or self.held or self.broken:
                break
            self._char(char, out)
        return "".join(out)

    def _char(self, c: str, out: list[str]) -> None:  # noqa: C901 - one branch per JSON state
        state = self.state
        if state == "string":
            if c == '"':
                out.append(self._flush_high() + '"')
                self._after_value(key=self.key)
            elif c == "\\":
                self.state = "escape"
            else:
                out.append(self._flush_high() + _dumped(c))
        elif state == "escape":
            if c == "u":
                self.state, self.hex = "unicode", ""
            elif c in _ESCAPES:
                out.append(self._flush_high() + _dumped(_ESCAPES[c]))
                self.state = "string"
            else:
                self.broken = True
        elif state == "unicode":
            if c not in "0123456789abcdefABCDEF":
                self.broken = True
                return
            self.hex += c
            if len(self.hex) == 4:
                self.state = "string"
                self._code_point(int(self.hex, 16), out)
        elif state == "scalar":
            if c in _SCALAR:
                self.scalar += c
                return
            try:
                out.append(json.dumps(json.loads(self.scalar)))
            except ValueError:
                self.broken = True
                return
            self._after_value(key=False)
            self._char(c, out)
        elif c in _SPACE:
            return
        elif state == "start":
            if c in "{[":
                self._open(c, out)
            else:
                self.held = True
        elif state in ("value", "value_or_end"):
            if state == "value_or_end" and c == "]":
                self._close(c, out)
            elif c in "{[":
                self._open(c, out)
            elif c == '"':
                out.append('"')
                self.state, self.key = "string", False
            elif c in _SCALAR:
                self.state, self.scalar = "scalar", c
            else:
                self.broken = True
        elif state in ("key", "key_or_end"):
            if state == "key_or_end" and c == "}":
                self._close(c, out)
            elif c == '"':
                out.append('"')
                self.state, self.key = "string", True
            else:
                self.broken = True
        elif state == "colon":
            if c == ":":
                out.append(": ")
                self.state = "value"
            else:
                self.broken = True
        elif state == "comma":
            if c == ",":
                out.append(", ")
                self.state = "key" if self.stack[-1] == "{" else "value"
            elif c in "}]":
                self._close(c, out)
            else:
                self.broken = True

    def _open(self, c: str, out: list[str]) -> None:
        self.stack.append(c)
        out.append(c)
        self.state = "key_or_end" if c == "{" else "value_or_end"

    def _close(self, c: str, out: list[str]) -> None:
        if {"{": "}", "[": "]"}[self.stack[-1]] != c:
            self.broken = True
            return
        self.stack.pop()
        out.append(c)
        self._after_value(key=False)

    def _after_value(self, key: bool) -> None:
        if key:
            self.state = "colon"
        elif not self.stack:
            self.done = True
        else:
            self.state = "comma"

    def _code_point(self, code: int, out: list[str]) -> None:
        if 0xD800 <= code < 0xDC00:  # a high surrogate: json.loads joins it with a low one that follows
            out.append(self._flush_high())
            self.high = chr(code)
        elif 0xDC00 <= code < 0xE000 and self.high:
            joined = 0x10000 + ((ord(self.high) - 0xD800) << 10) + (code - 0xDC00)
            self.high = ""
            out.append(_dumped(chr(joined)))
        else:
            out.append(self._flush_high() + _dumped(chr(code)))

    def _flush_high(self) -> str:
        high, self.high = self.high, ""
        return _dumped(high) if high else ""
