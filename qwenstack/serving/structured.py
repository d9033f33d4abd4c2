"""Structured output: OpenAI `response_format` and forced tool calls, enforced token by token with xgrammar.

    processor = make_json_processor(tokenizer, {"type": "json_schema", "json_schema": {"name": "x", "schema": {...}}})
    SamplingParams(..., logits_processors=[processor])        # one processor per generated sequence

Decisions:
- The grammar's vocabulary comes from the tokenizer itself (`tokenizers` vocabulary, byte-level for Qwen3), not
  from transformers. Special tokens (<|im_start|>, <|endoftext|>, ...) are given no text, so the grammar never
  allows them; the eos ids are the grammar's stop tokens, allowed only once the grammar is complete. Logits rows
  longer than the vocabulary (lm_head padding) have the extra ids masked.
- Compiled grammars are cached per tokenizer and per (kind, schema, options); a processor holds only its matcher,
  so creating one per request is cheap after the first.
- A processor is per sequence. It receives the full output each call and feeds the matcher only the tokens added
  since its last call; if the list is not a continuation of what it saw (a reused processor, a recomputed
  sequence), it replays from the start. A token the grammar rejects (another processor forced it) turns the
  processor off with a warning rather than failing the engine step.
- Thinking: with `thinking=True` the output may open with a `<think>...</think>` block (it must close one when
  the prompt pre-filled `<think>`, `starts_in_reasoning=True`), then up to 8 whitespace characters, then the
  constrained part. This is how vLLM applies grammars after reasoning, and it lets a thinking budget force
  "\\n</think>\\n\\n" through the grammar.
- Invalid schemas, tools or tool choices raise StructuredOutputError (a RequestError, so a ValueError: HTTP 400).
"""
from __future__ import annotations

import json
import logging
import re
import threading
import weakref
from collections import OrderedDict
from typing import Any, Mapping, Sequence

import torch

from qwenstack.engine.params import LogitsProcessor
from qwenstack.errors import RequestError
from qwenstack.tokenizer import Tokenizer

log = logging.getLogger("qwenstack.structured")

TOOL_CALL_PREFIX = '<tool_call>\n{"name": '
TOOL_CALL_ARGUMENTS = ', "arguments": '
TOOL_CALL_SUFFIX = "}\n</tool_call>"
THINK_START, THINK_END = "<think>", "</think>"
AFTER_THINK_WHITESPACE = r"[ \t\r\n]{0,8}"
MAX_CACHED_GRAMMARS = 128


class StructuredOutputError(RequestError):
    """A response_format, tool list or tool_choice that cannot be turned into a grammar."""


def _xgr() -> Any:
    import xgrammar  # imported on first use: the server starts without paying for it

    return xgrammar


def _clean_xgrammar_message(exc: Exception) -> str:
    # xgrammar's C++ errors start with "[time] /path/file.cc:line: " and sometimes "Check failed: (...) is false: ".
    text = re.sub(r"^\[[\d:]+\]\s+\S+:\d+:\s*", "", str(exc).strip())
    text = re.sub(r"^Check failed: \(.*?\) is false:\s*", "", text)
    return text.splitlines()[0] if text else type(exc).__name__


class _GrammarCache:
    """The tokenizer as xgrammar sees it, its compiler, and an LRU of compiled grammars."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        xgr = _xgr()
        backend = tokenizer.backend
        self.vocab_size = tokenizer.vocab_size
        encoded = [""] * self.vocab_size
        for text, i in backend.get_vocab(with_added_tokens=True).items():
            if i < self.vocab_size:
                encoded[i] = text
        for i, added in backend.get_added_tokens_decoder().items():
            if added.special and i < self.vocab_size:
                encoded[i] = ""  # no text: the grammar never allows it (stop tokens are handled apart)
        stop = [i for i in tokenizer.eos_token_ids if i < self.vocab_size]
        if not stop:
            raise StructuredOutputError("structured output needs an end-of-sequence token, and this tokenizer has none")
        self.info = xgr.TokenizerInfo(encoded, _vocab_type(backend), vocab_size=self.vocab_size, stop_token_ids=stop)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1)
        self.compiled: OrderedDict[str, Any] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: str, compile_fn: Any) -> Any:
        with self.lock:
            if key in self.compiled:
                self.compiled.move_to_end(key)
                return self.compiled[key]
        try:
            grammar = compile_fn(self.compiler)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise StructuredOutputError(f"invalid schema: {_clean_xgrammar_message(exc)}") from None
        with self.lock:
            self.compiled[key] = grammar
            while len(self.compiled) > MAX_CACHED_GRAMMARS:
                self.compiled.popitem(last=False)
        return grammar


def _vocab_type(backend: Any) -> Any:
    from tokenizers import decoders

    xgr = _xgr()
    if isinstance(backend.decoder, decoders.ByteLevel):
        return xgr.VocabType.BYTE_LEVEL
    if "ByteFallback" in json.dumps(json.loads(backend.to_str()).get("decoder")):
        return xgr.VocabType.BYTE_FALLBACK
    return xgr.VocabType.RAW


_CACHES: dict[int, _GrammarCache] = {}
_CACHES_LOCK = threading.Lock()


def _cache_for(tokenizer: Tokenizer) -> _GrammarCache:
    key = id(tokenizer)
    with _CACHES_LOCK:
        cache = _CACHES.get(key)
    if cache is None:
        cache = _GrammarCache(tokenizer)
        with _CACHES_LOCK:
            if key not in _CACHES:
                _CACHES[key] = cache
                weakref.finalize(tokenizer, _CACHES.pop, key, None)
            cache = _CACHES[key]
    return cache


class GrammarLogitsProcessor:
    """Masks every token the grammar does not allow next (eos only once the grammar is complete)."""

    def __init__(self, compiled: Any, cache: _GrammarCache, description: str) -> None:
        xgr = _xgr()
        self._xgr = xgr
        self.compiled = compiled
        self.matcher = xgr.GrammarMatcher(compiled)
        self.description = description
        self._bitmask = xgr.allocate_token_bitmask(1, cache.vocab_size)
        self._vocab_size = cache.vocab_size
        self._seen = 0  # output tokens fed to the matcher
        self._last: int | None = None
        self.disabled = False

    def _advance(self, output_token_ids: Sequence[int]) -> None:
        n = len(output_token_ids)
        if n < self._seen or (self._seen and output_token_ids[self._seen - 1] != self._last):
            self.matcher.reset()  # not the continuation of what we saw: replay
            self._seen, self.disabled = 0, False
        for token in output_token_ids[self._seen :]:
            if self.disabled or self.matcher.is_terminated():
                break  # after eos (ignore_eos) nothing is constrained any more
            if not self.matcher.accept_token(token):
                log.warning("token %d breaks the %s grammar (forced by another processor?); no longer constraining",
                            token, self.description)
                self.disabled = True
        self._seen = n
        self._last = output_token_ids[-1] if n else None

    def __call__(self, output_token_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        self._advance(output_token_ids)
        if self.disabled or self.matcher.is_terminated():
            return logits
        self.matcher.fill_next_token_bitmask(self._bitmask)
        allowed = _unpack(self._bitmask[0], self._vocab_size).to(logits.device)
        n = min(self._vocab_size, logits.shape[-1])
        logits[:n].masked_fill_(~allowed[:n], float("-inf"))
        logits[n:] = float("-inf")  # lm_head padding past the tokenizer's vocabulary
        return logits

    @property
    def is_completed(self) -> bool:
        return bool(self.matcher.is_completed())


_SHIFTS = torch.arange(32, dtype=torch.int32)


def _unpack(bitmask_row: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 words, bit j of word w = token 32 w + j -> bool [vocab_size]."""
    return ((bitmask_row.unsqueeze(-1) >> _SHIFTS) & 1).flatten()[:vocab_size].bool()


def _think_prefix(thinking: bool, starts_in_reasoning: bool) -> list[Any]:
    """Structural-tag elements for an optional (or, when pre-filled, mandatory) leading think block."""
    if not thinking and not starts_in_reasoning:
        return []
    from xgrammar.structural_tag import AnyTextFormat, OptionalFormat, RegexFormat, SequenceFormat, TagFormat

    block = TagFormat(begin="" if starts_in_reasoning else THINK_START,
                      content=AnyTextFormat(excludes=[THINK_START]), end=THINK_END)
    element = SequenceFormat(elements=[block, RegexFormat(pattern=AFTER_THINK_WHITESPACE)])
    return [element] if starts_in_reasoning else [OptionalFormat(content=element)]


_NOT_SCHEMAS = frozenset({"const", "enum", "default", "examples"})  # values, not subschemas


def _json_safe_schema(node: Any, string_context: bool = False) -> Any:
    """xgrammar 0.2's grammar for strings with minLength/maxLength admits raw control characters, which JSON
    forbids; an equivalent pattern (applied to the decoded string) does not. Rewrites those strings."""
    if isinstance(node, list):
        return [_json_safe_schema(x) for x in node]
    if not isinstance(node, Mapping):
        return node
    out = {k: (v if k in _NOT_SCHEMAS else _json_safe_schema(v, k == "propertyNames")) for k, v in node.items()}
    lengths = [out.get("minLength"), out.get("maxLength")]
    is_string = out.get("type") == "string" or (string_context and "type" not in out)
    if (is_string and any(isinstance(n, int) and not isinstance(n, bool) for n in lengths)
            and not {"pattern", "format", "enum", "const"} & out.keys()):
        low = lengths[0] if isinstance(lengths[0], int) else 0
        high = lengths[1] if isinstance(lengths[1], int) else ""
        out.pop("minLength", None)
        out.pop("maxLength", None)
        out["pattern"] = "^[^\\x00-\\x1f]{%d,%s}$" % (low, high)
    return out


def _schema_of(response_format: Mapping[str, Any]) -> tuple[str, Any]:
    """('object', None) for any JSON object, ('schema', schema) for a schema."""
    if not isinstance(response_format, Mapping):
        raise StructuredOutputError("response_format must be an object")
    kind = response_format.get("type")
    spec = response_format.get("json_schema")
    schema: Any = None
    if isinstance(spec, Mapping) and "schema" in spec:
        schema = spec["schema"]
    elif "schema" in response_format:  # llama.cpp's shorthand
        schema = response_format["schema"]
    elif spec is not None and not isinstance(spec, Mapping):
        raise StructuredOutputError("response_format.json_schema must be an object with a 'schema'")
    if kind == "json_object" and schema is None:
        return "object", None
    if kind not in ("json_schema", "json_object"):
        raise StructuredOutputError(
            f"response_format type {kind!r} cannot be enforced; use 'json_object' or 'json_schema' ('text' needs none)")
    if schema is None:
        raise StructuredOutputError("response_format type 'json_schema' needs json_schema.schema")
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise StructuredOutputError(f"json_schema.schema is not valid JSON: {exc}") from None
    if not isinstance(schema, (Mapping, bool)):
        raise StructuredOutputError("json_schema.schema must be a JSON Schema object")
    return "schema", _json_safe_schema(schema)


def make_json_processor(tokenizer: Tokenizer, response_format: Mapping[str, Any], *, thinking: bool = False,
                        starts_in_reasoning: bool = False) -> LogitsProcessor:
    """A per-sequence processor that makes the output a JSON object ({"type": "json_object"}) or an instance of
    a schema ({"type": "json_schema", "json_schema": {"name", "schema", "strict"}}, or a bare "schema" key).
    With thinking, a leading think block is allowed first (see the module notes)."""
    kind, schema = _schema_of(response_format)
    cache = _cache_for(tokenizer)
    body = {"type": "object"} if kind == "object" else schema
    # json_object: any object, extra keys allowed; a schema: xgrammar's strict mode (no undeclared keys).
    strict = kind != "object"
    key = json.dumps(["json", body, strict, thinking, starts_in_reasoning], sort_keys=True)
    prefix = _think_prefix(thinking, starts_in_reasoning)

    def compile_fn(compiler: Any) -> Any:
        if not prefix:
            return compiler.compile_json_schema(body, strict_mode=strict)
        from xgrammar.structural_tag import GrammarFormat, SequenceFormat, StructuralTag

        grammar = _xgr().Grammar.from_json_schema(body, strict_mode=strict)
        tag = StructuralTag(format=SequenceFormat(elements=[*prefix, GrammarFormat(grammar=str(grammar))]))
        return compiler.compile_structural_tag(tag)

    return GrammarLogitsProcessor(cache.get(key, compile_fn), cache, "response_format")


def _tool_functions(tools: Sequence[Mapping[str, Any]] | None) -> dict[str, Any]:
    """name -> parameters schema, validated."""
    if not tools:
        raise StructuredOutputError("tool_choice requires a non-empty tools list")
    functions: dict[str, Any] = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise StructuredOutputError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}")
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object"}
        if not isinstance(params, (Mapping, bool)):
            raise StructuredOutputError(f"tools[{i}].function.parameters must be a JSON Schema object")
        functions[fn["name"]] = _json_safe_schema(params)
    return functions


def _chosen_names(functions: Mapping[str, Any], tool_choice: Any) -> list[str]:
    if tool_choice == "required":
        return list(functions)
    if isinstance(tool_choice, Mapping):
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, Mapping) else None
        if not isinstance(name, str):
            raise StructuredOutputError(
                "tool_choice must be 'required' or {'type': 'function', 'function': {'name': ...}}")
        if name not in functions:
            raise StructuredOutputError(f"tool_choice names function {name!r}, which is not in tools")
        return [name]
    raise StructuredOutputError(
        f"tool_choice {tool_choice!r} needs no grammar; only 'required' or a named function is enforced")


def make_tool_call_processor(tokenizer: Tokenizer, tools: Sequence[Mapping[str, Any]], tool_choice: Any, *,
                             parallel_tool_calls: bool = False, thinking: bool = False,
                             starts_in_reasoning: bool = False) -> LogitsProcessor:
    """A per-sequence processor that makes the output Qwen3 tool calls, then eos:
    `<tool_call>\\n{"name": NAME, "arguments": ARGS}\\n</tool_call>` with NAME one of the tools ("required") or the
    named one, and ARGS an instance of that tool's parameters schema. With parallel_tool_calls, one or more
    calls separated by a newline. With thinking, a leading think block is allowed first."""
    functions = _tool_functions(tools)
    names = _chosen_names(functions, tool_choice)
    cache = _cache_for(tokenizer)
    key = json.dumps(["tools", [[n, functions[n]] for n in names], parallel_tool_calls, thinking,
                      starts_in_reasoning], sort_keys=True)
    prefix = _think_prefix(thinking, starts_in_reasoning)

    def compile_fn(compiler: Any) -> Any:
        from xgrammar.structural_tag import (JSONSchemaFormat, SequenceFormat, StructuralTag, TagFormat,
                                             TagsWithSeparatorFormat)

        tags = [TagFormat(begin=TOOL_CALL_PREFIX + json.dumps(name, ensure_ascii=False) + TOOL_CALL_ARGUMENTS,
                          content=JSONSchemaFormat(json_schema=functions[name]), end=TOOL_CALL_SUFFIX)
                for name in names]
        calls = TagsWithSeparatorFormat(tags=tags, separator="\n", at_least_one=True,
                                        stop_after_first=not parallel_tool_calls)
        return compiler.compile_structural_tag(StructuralTag(format=SequenceFormat(elements=[*prefix, calls])))

    return GrammarLogitsProcessor(cache.get(key, compile_fn), cache, "tool call")
