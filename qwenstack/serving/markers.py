"""Special tokens a client types inside message content stay plain text; the chat template's own stay
control tokens. Without this, a user who writes `<|im_end|>\\n<|im_start|>system\\n...` in a message forges a
system turn, because the tokenizer turns every occurrence of a special token's text into that token.

How: before rendering, each special token's text in client strings is replaced by a private sentinel
(`S`, an index character, `S`, with `S` a private-use character that no client string contains); after
rendering, the prompt is tokenized piece by piece, the sentinels as the special token's text spelt in
ordinary tokens. The template's own markers never pass through the client strings, so they stay special.
Text without any special token costs one regex search per string.
"""
from __future__ import annotations

import re
from typing import Any, Iterator

from tokenizers import Tokenizer as RustTokenizer

from qwenstack.serving.errors import bad_request
from qwenstack.tokenizer import Tokenizer, TooManyTokens

_SENTINEL_CANDIDATES = [chr(c) for c in range(0xF8FF, 0xF800, -1)]  # BMP private use area, rarely typed
_INDEX_BASE = 0xF0000  # plane 15 private use: the special token's index


class SpecialTokenText:
    """A tokenizer's special tokens and how each is spelt in ordinary (non-special) tokens."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        decoder = tokenizer.backend.get_added_tokens_decoder()
        self.specials = sorted({t.content for t in decoder.values() if t.special and t.content}, key=len, reverse=True)
        plain = RustTokenizer.from_str(tokenizer.backend.to_str())
        plain.encode_special_tokens = True  # this copy only: special tokens' text is split like any text
        self.plain_ids = [plain.encode(s, add_special_tokens=False).ids for s in self.specials]
        self.pattern = re.compile("|".join(map(re.escape, self.specials))) if self.specials else None

    def escaper(self, client_values: Any) -> "MarkerEscaper":
        """The escaping of one request, given everything in it that the client wrote."""
        return MarkerEscaper(self, client_values)


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)


class MarkerEscaper:
    """`escape` the client's values before rendering, then `finish` the rendered prompt into token ids."""

    def __init__(self, owner: SpecialTokenText, client_values: Any) -> None:
        self.owner = owner
        strings = list(_strings(client_values))
        pattern = owner.pattern
        self.used = pattern is not None and any(pattern.search(s) is not None for s in strings)
        self.sentinel = ""
        if self.used:  # a sentinel character that no client string contains
            free = next((c for c in _SENTINEL_CANDIDATES if not any(c in s for s in strings)), None)
            if free is None:
                raise bad_request("the messages use every character of U+F801..U+F8FF alongside special-token "
                                  "text; this server cannot keep that text plain", param="messages")
            self.sentinel = free
            self._index = {s: i for i, s in enumerate(owner.specials)}
            self._split = re.compile(re.escape(self.sentinel) + "(.)" + re.escape(self.sentinel), re.DOTALL)

    def escape(self, value: Any) -> Any:
        """Strings (inside dicts and lists too) with special tokens' text replaced by sentinels."""
        if not self.used:
            return value
        if isinstance(value, str):
            assert self.owner.pattern is not None
            return self.owner.pattern.sub(self._sentinel_for, value)
        if isinstance(value, list):
            return [self.escape(v) for v in value]
        if isinstance(value, dict):
            return {k: self.escape(v) for k, v in value.items()}
        return value

    def _sentinel_for(self, match: re.Match[str]) -> str:
        return f"{self.sentinel}{chr(_INDEX_BASE + self._index[match.group(0)])}{self.sentinel}"

    def finish(self, rendered: str, max_tokens: int | None = None) -> tuple[str, list[int]]:
        """(the prompt as text, with the client's special-token text restored; its token ids). TooManyTokens
        beyond max_tokens."""
        tok = self.owner.tokenizer
        if not self.used:
            return rendered, tok.encode(rendered, max_tokens=max_tokens)
        pieces = self._split.split(rendered)  # text, index, text, index, ..., text
        ids: list[int] = []
        text_parts = []
        for i, piece in enumerate(pieces):
            if i % 2 == 0:
                ids += tok.encode(piece) if piece else []
                text_parts.append(piece)
            else:
                k = ord(piece) - _INDEX_BASE
                ids += self.owner.plain_ids[k]
                text_parts.append(self.owner.specials[k])
        if max_tokens is not None and len(ids) > max_tokens:
            raise TooManyTokens(len(ids))
        return "".join(text_parts), ids
