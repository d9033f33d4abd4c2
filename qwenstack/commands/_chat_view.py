"""Terminal rendering of one streamed chat reply: thinking dimmed while it streams, then folded to one line.

On a terminal the thinking is written live (ANSI dim) and, when the answer begins, erased and replaced by
"[thought for N tokens — /show to expand]"; erasing needs the number of screen rows written, counted
from the text and the terminal width (wide CJK characters count as two columns). Thinking taller than
the screen has scrolled out of reach, so then the fold line is written below it instead. Without a
terminal (a pipe, a test) nothing is erased: only the fold line and the answer are written.
"""
from __future__ import annotations

import shutil
import unicodedata
from typing import Callable, TextIO

DIM = "\x1b[2m"
RESET = "\x1b[0m"


def display_width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(ch) in ("W", "F") else 8 if ch == "\t" else 1 for ch in text)


def screen_rows(text: str, columns: int) -> int:
    """Rows `text` occupies when written from the start of a row (the last, partial, row included)."""
    columns = max(columns, 1)
    return sum(max(1, -(-display_width(line) // columns)) for line in text.split("\n"))


def fold_line(num_tokens: int) -> str:
    return f"[thought for {num_tokens} tokens — /show to expand]"


class ReplyView:
    """Receives reasoning and content text as it is parsed; writes it to `out`."""

    def __init__(self, out: TextIO, *, live: bool, color: bool, show_thinking: bool,
                 count_tokens: Callable[[str], int]) -> None:
        self.out = out
        self.live = live  # a terminal: thinking is streamed, then erased
        self.color = color
        self.show_thinking = show_thinking  # keep the thinking on screen, never fold
        self.count_tokens = count_tokens
        self.reasoning = ""
        self.content = ""
        self._written_thinking = ""  # what is on screen since the thinking began
        self._folded = False
        self._at_line_start = True

    def _write(self, text: str, dim: bool = False) -> None:
        if not text:
            return
        self.out.write(f"{DIM}{text}{RESET}" if dim and self.color else text)
        self.out.flush()
        self._at_line_start = text.endswith("\n")

    def reasoning_delta(self, text: str) -> None:
        if not text:
            return
        self.reasoning += text
        if self.live or self.show_thinking:
            self._written_thinking += text
            self._write(text, dim=True)

    def content_delta(self, text: str) -> None:
        if not text:
            return
        if self.reasoning and not self._folded:
            self.fold()
        self.content += text
        self._write(text)

    def fold(self) -> None:
        """Replace the thinking on screen (if any) by one line."""
        self._folded = True
        if not self.reasoning:
            return
        if self.show_thinking:
            self._write("\n\n" if not self._at_line_start else "\n")
            return
        if self.live and self._written_thinking:
            rows = screen_rows(self._written_thinking, shutil.get_terminal_size().columns)
            if rows < shutil.get_terminal_size().lines:
                self.out.write("\r" + (f"\x1b[{rows - 1}A" if rows > 1 else "") + "\x1b[J")
                self._at_line_start = True
            elif not self._at_line_start:
                self._write("\n")
        self._write(fold_line(self.count_tokens(self.reasoning)) + "\n\n", dim=True)

    def end(self, note: str | None = None) -> None:
        """The reply is over: fold thinking that was never followed by an answer, end the line."""
        if not self._folded:
            self.fold()
        if not self._at_line_start:
            self._write("\n")
        if note:
            self._write(note, dim=True)
            self._write("\n")
