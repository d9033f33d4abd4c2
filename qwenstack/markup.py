"""Qwen3's chat markup, defined once: the think-block and tool-call tags its chat template and its models
write, and the byte-level alphabet its tokenizer spells bytes in. Parsers, grammars, the thinking budget
and logprobs all read these names.
"""
from __future__ import annotations

from functools import lru_cache

TURN_START = "<|im_start|>"  # ChatML: a turn's first token (its role follows)
THINK_START = "<think>"
THINK_END = "</think>"
TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"


@lru_cache(maxsize=1)
def byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, as a byte-level BPE vocabulary writes bytes: character -> byte. The
    printable bytes stand for themselves; the others are mapped in order to U+0100 and up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    chars = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = chr(256 + n)
    return {c: b for b, c in chars.items()}
