"""Where committed source text is cut into translation units (pure Python, no torch).

A unit is translated once, when it is complete, and its translation is published whole: published text
never has to be taken back. A unit ends
- after a sentence end (. ! ? … and the CJK 。！？),
- after a clause end (, ; : and ，；、) when `clauses` is on,
- after `wait_k` words without either (a segment-level wait-k: at most k source words wait untranslated),
- and at the end of the stream (`final`).

The cut is prefix-stable: a boundary found in committed text is found again in any longer text that starts
with it, because a Latin-script word counts only once whitespace follows it (a "3." may still become
"3.5") and a CJK punctuation mark ends its piece by itself. So the units of a live stream are exactly the
units of its final transcript, which is what makes a live session equal to the offline pipeline.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

SENTENCE_END = ".!?…。！？"
CLAUSE_END = ",;:，；、："
CLOSERS = "\"')]}»”’"
# A piece: text up to and including a CJK mark, or a word with the whitespace after it.
_PIECE = re.compile(r"[^\s。！？，；、：]*[。！？，；、：]\s*|\S+\s+")


@dataclass(frozen=True)
class UnitPolicy:
    clauses: bool = True
    wait_k: int = 8  # most complete words a unit holds without a boundary

    def __post_init__(self) -> None:
        if self.wait_k < 1:
            raise ValueError("wait_k must be at least 1")


def _ends(piece: str, policy: UnitPolicy) -> bool:
    word = piece.rstrip().rstrip(CLOSERS)
    if not word:
        return False
    marks = SENTENCE_END + (CLAUSE_END if policy.clauses else "")
    return word[-1] in marks


def cut_units(text: str, policy: UnitPolicy, final: bool = False) -> tuple[list[str], int]:
    """The complete units at the start of `text` and how many characters they consume. With `final`, what
    remains is one more unit (the stream has ended)."""
    units: list[str] = []
    start = pos = words = 0
    while pos < len(text):
        if text[pos].isspace():  # whitespace after a CJK mark that a shorter prefix ended on
            pos += 1
            continue
        match = _PIECE.match(text, pos)
        if match is None or match.end() == pos:
            break  # the incomplete tail: a word that whitespace has not ended yet
        pos = match.end()
        words += 1
        if _ends(match.group(), policy) or words >= policy.wait_k:
            unit = text[start:pos].strip()
            if unit:
                units.append(unit)
            start, words = pos, 0
    if final and text[start:].strip():
        units.append(text[start:].strip())
        start = len(text)
    return units, start


def split_units(text: str, policy: UnitPolicy) -> list[str]:
    """The units of a finished text (what the offline pipeline translates)."""
    return cut_units(text, policy, final=True)[0]


def joiner(language: str) -> str:
    """What goes between translated units: nothing for scripts written without spaces."""
    return "" if language.lower() in ("zh", "ja", "yue", "th", "chinese", "japanese", "cantonese", "thai") else " "


__all__ = ["UnitPolicy", "cut_units", "joiner", "split_units"]
