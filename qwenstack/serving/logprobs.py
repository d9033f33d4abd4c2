"""Logprobs in the two OpenAI shapes: chat (`content: [{token, logprob, bytes, top_logprobs}]`) and the
legacy completions one (`tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset`) that
lm-evaluation-harness reads to score prompts; and vLLM's prompt_logprobs (`{token id: {logprob, rank,
decoded_token}}` a position).

A token's text is its exact bytes (byte-level BPE maps each byte to one printable character; added tokens
are their literal text), decoded leniently: a token holding half of a UTF-8 character shows U+FFFD, but
its `bytes` are exact, so a client can join them.
"""
from __future__ import annotations

from typing import Any, Iterable

from qwenstack.engine.sequence import Logprob, PositionLogprobs
from qwenstack.markup import byte_level_decoder
from qwenstack.tokenizer import Tokenizer


class TokenTexts:
    """Token id -> (text, bytes), cached per tokenizer."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._added = {i: t.content for i, t in tokenizer.backend.get_added_tokens_decoder().items()}
        self._cache: dict[int, tuple[str, bytes]] = {}

    def get(self, token_id: int) -> tuple[str, bytes]:
        hit = self._cache.get(token_id)
        if hit is not None:
            return hit
        raw = self._bytes(token_id)
        entry = (raw.decode("utf-8", errors="replace"), raw)
        self._cache[token_id] = entry
        return entry

    def _bytes(self, token_id: int) -> bytes:
        if token_id in self._added:
            return self._added[token_id].encode("utf-8")
        piece = self.tokenizer.id_to_token(token_id)
        if piece is None:
            return b""
        table = byte_level_decoder()
        if all(c in table for c in piece):
            return bytes(table[c] for c in piece)
        return self.tokenizer.decode([token_id]).encode("utf-8")  # not byte-level BPE

    def text(self, token_id: int) -> str:
        return self.get(token_id)[0]


def _ranked(entry: PositionLogprobs, top: int) -> list[tuple[int, Logprob]]:
    """The position's `top` most likely tokens, most likely first."""
    items = sorted(entry.items(), key=lambda kv: kv[1].rank)
    return [(tid, lp) for tid, lp in items if lp.rank <= top][:top]


def token_logprob(texts: TokenTexts, token_id: int, logprob: float) -> dict:
    """One token as OpenAI writes it: `{token, logprob, bytes}` (chat's entries and its alternatives, and the
    logprobs of a transcription)."""
    text, raw = texts.get(token_id)
    return {"token": text, "logprob": logprob, "bytes": list(raw)}


def token_logprobs(texts: TokenTexts, token_ids: Iterable[int], entries: Iterable[PositionLogprobs]) -> list[dict]:
    """The chosen tokens' logprobs without alternatives (a transcription's `logprobs`)."""
    return [token_logprob(texts, token, entry[token].logprob) for token, entry in zip(token_ids, entries)]


def chat_logprobs(texts: TokenTexts, token_ids: Iterable[int], entries: Iterable[PositionLogprobs],
                  top: int) -> list[dict]:
    out = []
    for token, entry in zip(token_ids, entries):
        tops = [token_logprob(texts, tid, lp.logprob) for tid, lp in _ranked(entry, top)]
        out.append({**token_logprob(texts, token, entry[token].logprob), "top_logprobs": tops})
    return out


class LegacyLogprobsBuilder:
    """Accumulates the legacy shape for one choice; text_offset counts characters of the returned text."""

    def __init__(self, texts: TokenTexts, top: int, start_offset: int = 0) -> None:
        self.texts = texts
        self.top = top
        self._bytes = b""
        self._start = start_offset

    def add(self, token_ids: Iterable[int], entries: Iterable[PositionLogprobs | None]) -> dict:
        """The logprobs of these tokens (appended to what came before), as a legacy logprobs dict."""
        tokens: list[str] = []
        token_logprobs: list[float | None] = []
        top_logprobs: list[dict[str, float] | None] = []
        offsets: list[int] = []
        for token, entry in zip(token_ids, entries):
            text, raw = self.texts.get(token)
            # Offsets in characters of the text so far: decode the bytes before this token (a split
            # character counts once it is complete).
            offsets.append(self._start + len(self._bytes.decode("utf-8", errors="ignore")))
            self._bytes += raw
            tokens.append(text)
            if entry is None:  # the first prompt token has nothing before it to be predicted from
                token_logprobs.append(None)
                top_logprobs.append(None)
                continue
            token_logprobs.append(entry[token].logprob)
            tops: dict[str, float] = {}
            # The chosen token is listed too (as vLLM does), so a harness can test greediness.
            for tid, lp in _ranked(entry, self.top) + [(token, entry[token])]:
                key = self.texts.text(tid)
                tops[key] = max(lp.logprob, tops.get(key, float("-inf")))
            top_logprobs.append(tops)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                "text_offset": offsets}


def prompt_logprobs_out(texts: TokenTexts, token_ids: list[int], entries: Iterable[PositionLogprobs | None] | None,
                        top: int) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's prompt_logprobs of these prompt tokens: the token's own entry, then the `top` most likely (the first
    token has nothing before it to be predicted from: null)."""
    out: list[dict[str, dict[str, Any]] | None] = []
    listed = list(entries or [])
    listed += [None] * (len(token_ids) - len(listed))
    for token, entry in zip(token_ids, listed):
        if entry is None:
            out.append(None)
            continue
        position: dict[str, dict[str, Any]] = {}
        for tid, lp in [(token, entry[token])] + _ranked(entry, top):
            position.setdefault(str(tid), {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": texts.text(tid)})
        out.append(position)
    return out


def merge_legacy(parts: list[dict]) -> dict:
    merged: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for part in parts:
        for key in merged:
            merged[key].extend(part[key])
    return merged
