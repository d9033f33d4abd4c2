"""Structured output: OpenAI `response_format`, vLLM's regex, choice and grammar constraints, and forced tool
calls, enforced token by token with llguidance.

    processor = make_json_processor(tokenizer, {"type": "json_schema", "json_schema": {"name": "x", "schema": {...}}})
    processor = make_answer_processor(tokenizer, AnswerFormat("regex", "[0-9]{3}"))
    SamplingParams(..., logits_processors=[processor])        # the engine forks it for each sequence

Decisions:
- llguidance (a Rust core with no Python dependencies) rather than xgrammar, which needs transformers and triton
  at runtime. Its `llguidance.torch` helpers are not used: importing them costs seconds (torch.compile), and
  the mask is a few shifts here.
- The grammar's vocabulary comes from the tokenizer itself (`tokenizers` vocabulary, byte-level for Qwen3), not
  from transformers: each token's bytes go to llguidance through its TokenizerWrapper protocol. (Its own
  tokenizer.json loader marks every added token special; Qwen3's `<think>` and `<tool_call>` are added but not
  special, and must stay text the grammar can match.) Special tokens (<|im_start|>, <|endoftext|>, ...) are
  never named by a grammar, so never allowed; the eos ids are the grammar's stop tokens, allowed only once the
  grammar is complete. Logits rows longer than the vocabulary (lm_head padding) have the extra ids masked.
- Schemas are enforced with xgrammar's "strict mode", which this module always had: an object schema that
  declares properties (or required keys) admits no other keys, and prefixItems without items no more items,
  unless the schema says otherwise; a bare {"type": "object"} stays any object. Whitespace is compact by
  default: exactly json.dumps' separators (", " and ": ") and none elsewhere, so a small model cannot write
  newlines until max_tokens (the demo model did); `whitespace_pattern` (a regex, vLLM's
  guided_whitespace_pattern) allows that whitespace between tokens instead. None around the JSON; properties
  come in schema order; oneOf is read as anyOf and keywords llguidance cannot enforce are ignored (lenient), as
  xgrammar ignored them.
- A grammar is a Lark grammar (the think block, the tool-call frame) that references the answer's grammar and
  each JSON schema as a named sub-grammar (`@answer`, `@arguments_0`, ...); each schema is first checked on its
  own so that an invalid one is reported without Lark positions. Compiled grammars (a matcher in its start
  state) are cached per tokenizer and per (kind, schema, options); a processor holds a deep copy of one, so
  creating one per request is cheap after the first.
- A processor is per sequence. It receives the full output each call and feeds the matcher only the tokens added
  since its last call; if the list is not a continuation of what it saw (a reused processor, a recomputed
  sequence), it replays from the start. A token the grammar rejects (another processor forced it) turns the
  processor off with a warning rather than failing the engine step.
- Thinking: with `thinking=True` the output may open with a `<think>...</think>` block (it must close one when
  the prompt pre-filled `<think>`, `starts_in_reasoning=True`), then one or two whitespace characters (Qwen3
  writes "</think>\\n\\n"; with up to 8 allowed, the tiny demo model took all 8 before every tool call), then the
  constrained part. This is how vLLM applies grammars after reasoning, and it lets a thinking budget force
  "\\n</think>\\n\\n" through the grammar.
- A regex must match the whole answer (vLLM's guided_regex; `^` and `$` around it change nothing); a choice is
  one of its strings exactly; a grammar is Lark (llguidance's dialect) or GBNF (llama.cpp's), GBNF when a rule
  is defined with `::=` (vLLM's test), with `start` (Lark) or `root` (GBNF) the answer.
- Invalid schemas, patterns, grammars, tools or tool choices raise StructuredOutputError (a RequestError, so a
  ValueError: HTTP 400).
"""
from __future__ import annotations

import json
import logging
import re
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, Sequence

import torch

from qwenstack.engine.params import LogitsProcessor
from qwenstack.errors import RequestError
from qwenstack.markup import THINK_END, THINK_START, byte_level_decoder
from qwenstack.tokenizer import Tokenizer

log = logging.getLogger("qwenstack.structured")

TOOL_CALL_PREFIX = '<tool_call>\n{"name": '
TOOL_CALL_ARGUMENTS = ', "arguments": '
TOOL_CALL_SUFFIX = "}\n</tool_call>"
MAX_CACHED_GRAMMARS = 128
# llguidance's JSON options: oneOf read as anyOf, keywords it cannot enforce ignored rather than refused.
JSON_OPTIONS = {"coerce_one_of": True, "lenient": True, "json_allow_general_unicode_escapes": True}
# The default whitespace: json.dumps' separators and nothing else (bounded: a model cannot loop on it).
COMPACT_WHITESPACE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _whitespace_options(pattern: str | None) -> dict[str, Any]:
    return dict(COMPACT_WHITESPACE) if pattern is None else {"whitespace_flexible": True, "whitespace_pattern": pattern}


class StructuredOutputError(RequestError):
    """A response_format, tool list or tool_choice that cannot be turned into a grammar."""


def _llg() -> Any:
    import llguidance  # imported on first use: the server starts without paying for it

    return llguidance


def _clean_message(text: Any) -> str:
    # llguidance's messages can span lines (a regex error draws a caret under the pattern): one line.
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return " ".join(lines) if lines else "unknown error"


def _piece_decoder(backend: Any) -> Callable[[str], bytes]:
    """Vocabulary entry -> the bytes it stands for, by the tokenizer's decoder (byte-level, byte-fallback, raw)."""
    from tokenizers import decoders

    spec: Any = None
    if not isinstance(backend.decoder, decoders.ByteLevel):
        spec = json.loads(backend.to_str()).get("decoder") or {}
    text = json.dumps(spec)
    if spec is None or '"ByteLevel"' in text:
        chars = byte_level_decoder()

        def byte_level(piece: str) -> bytes:
            try:
                return bytes(chars[c] for c in piece)
            except KeyError:
                return piece.encode()

        return byte_level
    if '"ByteFallback"' in text or '"Metaspace"' in text:
        def sentencepiece(piece: str) -> bytes:
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                return bytes([int(piece[3:5], 16)])
            return piece.replace("\u2581", " ").encode()

        return sentencepiece
    return str.encode


class _Vocabulary:
    """The tokenizer as llguidance's TokenizerWrapper protocol describes it: each id's bytes, the special ids
    (never matched as text), eos, and a tokenize function."""

    is_tokenizer_wrapper = True
    bos_token_id = None

    def __init__(self, tokenizer: Tokenizer, stop: list[int]) -> None:
        backend = tokenizer.backend
        size = tokenizer.vocab_size
        to_bytes = _piece_decoder(backend)
        tokens: list[bytes | None] = [None] * size
        for piece, i in backend.get_vocab(with_added_tokens=False).items():
            if i < size:
                tokens[i] = to_bytes(piece)
        special = set(stop)
        for i, added in backend.get_added_tokens_decoder().items():
            if i < size:
                tokens[i] = added.content.encode()  # added tokens are stored as their text
                if added.special:
                    special.add(i)
        for i, token in enumerate(tokens):
            if token is None:  # a hole in the ids: a special token no grammar names
                tokens[i] = f"<|unused_{i}|>".encode()
                special.add(i)
        self.tokens: list[bytes] = tokens  # type: ignore[assignment]
        self.special_token_ids = sorted(special)
        self.eos_token_id = stop[0]
        self._backend = backend

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._backend.encode(text, add_special_tokens=False).ids


class _GrammarCache:
    """The tokenizer as llguidance sees it, and an LRU of compiled grammars (matchers in their start state)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        llg = _llg()
        self.vocab_size = tokenizer.vocab_size
        stop = [i for i in tokenizer.eos_token_ids if i < self.vocab_size]
        if not stop:
            raise StructuredOutputError("structured output needs an end-of-sequence token, and this tokenizer has none")
        self.eos_ids = frozenset(stop)
        self.tokenizer = llg.LLTokenizer(_Vocabulary(tokenizer, stop), eos_token=stop)
        self.compiled: OrderedDict[str, Any] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: str, grammar_fn: Callable[[], str], what: str = "schema") -> Any:
        """The compiled grammar for `key`, built by `grammar_fn` on a miss; `what` names it in errors."""
        with self.lock:
            if key in self.compiled:
                self.compiled.move_to_end(key)
                return self.compiled[key]
        matcher = self.compile(grammar_fn(), what)
        with self.lock:
            self.compiled[key] = matcher
            while len(self.compiled) > MAX_CACHED_GRAMMARS:
                self.compiled.popitem(last=False)
        return matcher

    def compile(self, grammar: str, what: str) -> Any:
        """A matcher for llguidance's grammar JSON, or StructuredOutputError. A grammar can compile and still
        fail at its first token (a rule that only refers to itself, a parser limit): that is refused here too,
        before a request runs unconstrained (see GrammarLogitsProcessor)."""
        matcher = _llg().LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise StructuredOutputError(f"invalid {what}: {_clean_message(matcher.get_error())}")
        for warning in matcher.get_grammar_warnings():
            log.info("structured output grammar: %s", warning)
        probe = matcher.deep_copy()
        bitmask = torch.zeros((self.vocab_size + 31) // 32, dtype=torch.int32)
        probe.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.numel() * 4)
        if probe.is_error():
            reason = (probe.get_error().strip().splitlines() or ["unknown error"])[0]
            raise StructuredOutputError(f"invalid {what}: no output can match it ({reason})")
        return matcher


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
        self.compiled = compiled  # the cached matcher in its start state; never advanced itself
        self.matcher = compiled.deep_copy()
        self.description = description
        self._cache = cache
        self._vocab_size = cache.vocab_size
        self._eos = cache.eos_ids
        self._bitmask = torch.zeros((cache.vocab_size + 31) // 32, dtype=torch.int32)
        self._seen = 0  # output tokens fed to the matcher
        self._last: int | None = None
        self._terminated = False  # the matcher took an eos
        self.disabled = False

    def fork(self) -> "GrammarLogitsProcessor":
        """Another sequence's processor: the same grammar from its start (see LogitsProcessor)."""
        return GrammarLogitsProcessor(self.compiled, self._cache, self.description)

    def _advance(self, output_token_ids: Sequence[int]) -> None:
        n = len(output_token_ids)
        if n < self._seen or (self._seen and output_token_ids[self._seen - 1] != self._last):
            self.matcher = self.compiled.deep_copy()  # not the continuation of what we saw: replay
            self._seen, self.disabled, self._terminated = 0, False, False
        for token in output_token_ids[self._seen :]:
            if self.disabled or self._terminated:
                break  # after eos (ignore_eos) nothing is constrained any more
            if not 0 <= token < self._vocab_size or not self.matcher.consume_token(token):
                log.warning("token %d breaks the %s grammar (forced by another processor?); no longer constraining",
                            token, self.description)
                self.disabled = True
            elif token in self._eos:
                self._terminated = True
        self._seen = n
        self._last = output_token_ids[-1] if n else None

    def __call__(self, output_token_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        self._advance(output_token_ids)
        if self.disabled or self._terminated:
            return logits
        self.matcher.unsafe_compute_mask_ptr(self._bitmask.data_ptr(), self._bitmask.numel() * 4)
        if self.matcher.is_error():  # a parser limit hit while computing the mask
            log.warning("the %s grammar failed (%s); no longer constraining", self.description,
                        _clean_message(self.matcher.get_error()))
            self.disabled = True
            return logits
        allowed = _unpack(self._bitmask, self._vocab_size).to(logits.device)
        n = min(self._vocab_size, logits.shape[-1])
        logits[:n].masked_fill_(~allowed[:n], float("-inf"))
        logits[n:] = float("-inf")  # lm_head padding past the tokenizer's vocabulary
        return logits

    @property
    def is_completed(self) -> bool:
        return self._terminated or bool(self.matcher.is_accepting())


_SHIFTS = torch.arange(32, dtype=torch.int32)


def _unpack(bitmask_row: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 words, bit j of word w = token 32 w + j -> bool [vocab_size]."""
    return ((bitmask_row.unsqueeze(-1) >> _SHIFTS) & 1).flatten()[:vocab_size].bool()


# ---- grammars: a Lark top level, with each JSON schema a named sub-grammar it references as @name

def _lark_string(text: str) -> str:
    return json.dumps(text)  # a Lark string literal: JSON's escapes are Lark's


def _think_rules(thinking: bool, starts_in_reasoning: bool) -> tuple[str, str]:
    """(what `start` opens with, the rules it needs) for an optional (or, when pre-filled, mandatory) leading
    think block: `<think>` (unless pre-filled), text without `<think>`/`</think>`, `</think>`, then one or two
    whitespace characters."""
    if not thinking and not starts_in_reasoning:
        return "", ""
    opening = "" if starts_in_reasoning else _lark_string(THINK_START) + " "
    rules = (f"THINK: {opening}THINK_TEXT {_lark_string(THINK_END)}\n"
             "THINK_TEXT: /(?s:.*)/ & ~/(?s:.*<\\/?think>.*)/\n"
             "AFTER_THINK: /[ \\t\\r\\n]{1,2}/\n")
    return ("THINK AFTER_THINK? " if starts_in_reasoning else "(THINK AFTER_THINK?)? "), rules


def _top_level(lark: str, subgrammars: Mapping[str, Mapping[str, Any]]) -> str:
    """llguidance's grammar JSON: the Lark grammar first, then the grammars it references by name (each
    {"json_schema": ...} or {"lark_grammar": ...})."""
    grammars: list[dict[str, Any]] = [{"lark_grammar": lark}]
    grammars += [{"name": name, **grammar} for name, grammar in subgrammars.items()]
    return json.dumps({"grammars": grammars})


def _checked_schema(schema: Any, whitespace_pattern: str | None = None) -> dict[str, Any]:
    """The schema with llguidance's JSON options, checked on its own (so its errors carry no Lark positions)."""
    if schema is True:
        schema = {}
    elif schema is False:
        raise StructuredOutputError("invalid schema: the schema `false` admits no value")
    body = {**schema, "x-guidance": {**JSON_OPTIONS, **_whitespace_options(whitespace_pattern)}}
    llg = _llg()
    try:
        error = llg.LLMatcher.validate_grammar(llg.LLMatcher.grammar_from_json_schema(json.dumps(body)))
    except (ValueError, TypeError) as exc:
        error = str(exc)
    if error:
        raise StructuredOutputError(f"invalid schema: {_clean_message(error)}")
    return body


_NOT_SCHEMAS = frozenset({"const", "enum", "default", "examples"})  # values, not subschemas
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})
_SCHEMA_LISTS = frozenset({"anyOf", "oneOf", "allOf", "prefixItems"})
_OBJECT_KEYWORDS = ("properties", "patternProperties", "required")
_BOUND_KEYWORDS = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "enum", "const"})
MAX_SAFE_INTEGER = 2**53 - 1  # I-JSON's (RFC 7493) interoperable integers; also bounds a digit loop


def _strict_schema(node: Any, in_all_of: bool = False) -> Any:
    """xgrammar's strict mode, which this module enforced before llguidance: an object schema with properties,
    patternProperties or required keys admits no undeclared key unless additionalProperties or
    unevaluatedProperties says so (required keys not in properties become declared, any value); prefixItems
    without items admit no more items; object keywords without a type mean an object. A bare
    {"type": "object"} stays any object. Members of allOf are left open (they are intersected).
    An unbounded integer is bounded to +-(2**53 - 1), so a small model cannot write digits until max_tokens."""
    if not isinstance(node, Mapping):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _NOT_SCHEMAS:
            out[key] = value
        elif key in _SCHEMA_MAPS and isinstance(value, Mapping):
            out[key] = {name: _strict_schema(sub) for name, sub in value.items()}
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            out[key] = [_strict_schema(sub, key == "allOf") for sub in value]
        elif isinstance(value, Mapping):
            out[key] = _strict_schema(value)
        elif key == "items" and isinstance(value, list):  # draft 4 tuple form
            out[key] = [_strict_schema(sub) for sub in value]
        else:
            out[key] = value
    if any(k in out for k in _OBJECT_KEYWORDS):
        types = out.get("type")
        if types is None and not {"anyOf", "oneOf", "allOf", "$ref", "enum", "const"} & out.keys():
            out["type"] = types = "object"
        is_object = types == "object" or (isinstance(types, list) and "object" in types)
        if is_object and not in_all_of and not {"additionalProperties", "unevaluatedProperties"} & out.keys():
            out["additionalProperties"] = False
            required = out.get("required")
            properties = out.get("properties")
            if isinstance(required, list) and (properties is None or isinstance(properties, Mapping)):
                missing = [k for k in required if isinstance(k, str) and k not in (properties or {})
                           and not out.get("patternProperties")]
                if missing:
                    out["properties"] = {**(properties or {}), **{k: {} for k in missing}}
    if out.get("type") == "integer" and not _BOUND_KEYWORDS & out.keys():
        out["minimum"], out["maximum"] = -MAX_SAFE_INTEGER, MAX_SAFE_INTEGER
    if isinstance(out.get("prefixItems"), list) and "items" not in out and "unevaluatedItems" not in out \
            and not in_all_of:
        out["items"] = False
    return out


AnswerKind = Literal["json_object", "json_schema", "regex", "choice", "grammar"]


@dataclass(frozen=True)
class AnswerFormat:
    """What the answer must be: any JSON object (spec None), an instance of a JSON schema (spec: the schema), a
    full match of a regex (spec: the pattern), one of some strings (spec: the list) or a sentence of a Lark or
    GBNF grammar (spec: its text)."""

    kind: AnswerKind
    spec: Any = None


def answer_format_of(response_format: Mapping[str, Any]) -> AnswerFormat:
    """An OpenAI response_format (json_object, or json_schema with its schema) as an AnswerFormat."""
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
        return AnswerFormat("json_object")
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
    return AnswerFormat("json_schema", schema)


def _check_regex(pattern: str) -> None:
    """A regex checked on its own, its error told by the regex parser's own line (no Lark positions)."""
    llg = _llg()
    error = llg.LLMatcher.validate_grammar(llg.grammar_from("regex", pattern))
    if error:
        reasons = [line.strip()[len("error:"):].strip() for line in error.splitlines()
                   if line.strip().startswith("error:")]
        raise StructuredOutputError(f"invalid regex {pattern!r}: {reasons[0] if reasons else _clean_message(error)}")


def _is_gbnf(grammar: str) -> bool:
    """Whether a grammar is GBNF (llama.cpp's) rather than Lark: a rule defined with `::=`, as vLLM tells them
    apart. llguidance's own test looks for a `start:` line only, so Lark's `?start:` (an inlined start rule, as
    outlines' CFG examples write it) went to the GBNF converter and came back a 400."""
    from llguidance.gbnf_to_lark import is_lark_syntax

    rules = (re.sub(r"(#|//).*$", "", line) for line in grammar.splitlines())
    return not is_lark_syntax(grammar) and any("::=" in rule for rule in rules)


def _as_lark(grammar: str) -> str:
    """A Lark or GBNF grammar as Lark, or StructuredOutputError."""
    if not _is_gbnf(grammar):
        return grammar
    from llguidance.gbnf_to_lark import gbnf_to_lark

    try:
        return gbnf_to_lark(grammar)
    except Exception as exc:  # the converter raises its own error types, and IndexError on some inputs
        raise StructuredOutputError(f"invalid grammar: {_clean_message(exc)}") from None


def _answer_grammar(fmt: AnswerFormat, whitespace_pattern: str | None) -> dict[str, Any]:
    """The `answer` sub-grammar of a format: a JSON schema or a Lark grammar."""
    if fmt.kind in ("json_object", "json_schema"):
        body = {"type": "object"} if fmt.kind == "json_object" else _strict_schema(fmt.spec)
        return {"json_schema": _checked_schema(body, whitespace_pattern)}
    if fmt.kind == "regex":
        if not isinstance(fmt.spec, str) or not fmt.spec:
            raise StructuredOutputError("a regex constraint must be a non-empty string")
        _check_regex(fmt.spec)
        return {"lark_grammar": f"start: /{_llg().regex_to_lark(fmt.spec)}/"}
    if fmt.kind == "choice":
        if not isinstance(fmt.spec, list) or not fmt.spec or not all(isinstance(c, str) and c for c in fmt.spec):
            raise StructuredOutputError("a choice constraint must be a non-empty list of non-empty strings")
        return {"lark_grammar": "start: " + " | ".join(_lark_string(c) for c in fmt.spec)}
    if fmt.kind == "grammar":
        if not isinstance(fmt.spec, str) or not fmt.spec.strip():
            raise StructuredOutputError("a grammar constraint must be a non-empty Lark or GBNF grammar")
        return {"lark_grammar": _as_lark(fmt.spec)}
    raise StructuredOutputError(f"unknown structured output kind {fmt.kind!r}")


def _checked_answer(cache: _GrammarCache, fmt: AnswerFormat, whitespace_pattern: str | None) -> dict[str, Any]:
    """_answer_grammar, a Lark one first compiled on its own, where a think block cannot hide its first token."""
    answer = _answer_grammar(fmt, whitespace_pattern)
    if "lark_grammar" in answer:
        cache.compile(json.dumps({"grammars": [answer]}), _what(fmt))
    return answer


def _what(fmt: AnswerFormat) -> str:
    """How errors name a format's grammar."""
    return "schema" if fmt.kind.startswith("json") else fmt.kind


def make_answer_processor(tokenizer: Tokenizer, fmt: AnswerFormat, *, thinking: bool = False,
                          starts_in_reasoning: bool = False, whitespace_pattern: str | None = None) -> LogitsProcessor:
    """A per-sequence processor that makes the output an answer of `fmt`, then eos. With thinking, a leading
    think block is allowed first (see the module notes)."""
    cache = _cache_for(tokenizer)
    what = _what(fmt)
    key = json.dumps([fmt.kind, fmt.spec, thinking, starts_in_reasoning, whitespace_pattern], sort_keys=True)

    def grammar_fn() -> str:
        opening, rules = _think_rules(thinking, starts_in_reasoning)
        answer = _checked_answer(cache, fmt, whitespace_pattern)
        return _top_level(f"start: {opening}@answer\n{rules}", {"answer": answer})

    description = "response_format" if what == "schema" else f"{fmt.kind} constraint"
    return GrammarLogitsProcessor(cache.get(key, grammar_fn, what), cache, description)


def make_json_processor(tokenizer: Tokenizer, response_format: Mapping[str, Any], *, thinking: bool = False,
                        starts_in_reasoning: bool = False, whitespace_pattern: str | None = None) -> LogitsProcessor:
    """make_answer_processor for an OpenAI response_format: a JSON object ({"type": "json_object"}) or an
    instance of a schema ({"type": "json_schema", "json_schema": {"name", "schema", "strict"}}, or a bare
    "schema" key). json_object admits extra keys; a schema is strict (no undeclared keys, see _strict_schema)."""
    return make_answer_processor(tokenizer, answer_format_of(response_format), thinking=thinking,
                                 starts_in_reasoning=starts_in_reasoning, whitespace_pattern=whitespace_pattern)


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
        if params is None or params is True:
            params = {"type": "object"}
        if not isinstance(params, (Mapping, bool)):
            raise StructuredOutputError(f"tools[{i}].function.parameters must be a JSON Schema object")
        functions[fn["name"]] = _object_schema(params, f"tools[{i}].function.parameters")
    return functions


def _object_schema(params: Any, where: str) -> Any:
    """A tool's arguments are a JSON object (OpenAI's `arguments`, Qwen3's "arguments"), whatever the schema
    leaves open: `{}` admitted any value, and a forced call's arguments came back a JSON string, which clients
    cannot splat into a function. A schema typed otherwise is a 400, as OpenAI's API answers it."""
    if not isinstance(params, Mapping):
        return params
    kind = params.get("type")
    if kind is None:
        return {"type": "object", **params}
    if kind == "object" or (isinstance(kind, list) and "object" in kind):
        return params
    raise StructuredOutputError(f"{where} must be a schema of type 'object', got type {kind!r}")


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
                             starts_in_reasoning: bool = False,
                             whitespace_pattern: str | None = None) -> LogitsProcessor:
    """A per-sequence processor that makes the output Qwen3 tool calls, then eos:
    `<tool_call>\\n{"name": NAME, "arguments": ARGS}\\n</tool_call>` with NAME one of the tools ("required") or the
    named one, and ARGS an instance of that tool's parameters schema. With parallel_tool_calls and "required",
    one or more calls separated by a newline; a named function is called once. With thinking, a leading think
    block is allowed first."""
    functions = _tool_functions(tools)
    names = _chosen_names(functions, tool_choice)
    if tool_choice != "required":  # a named function is called exactly once (OpenAI's and vLLM's forced call)
        parallel_tool_calls = False
    cache = _cache_for(tokenizer)
    key = json.dumps(["tools", [[n, functions[n]] for n in names], parallel_tool_calls, thinking,
                      starts_in_reasoning, whitespace_pattern], sort_keys=True)

    def grammar_fn() -> str:
        lark, schemas = _call_rules(functions, names, parallel_tool_calls, whitespace_pattern)
        opening, rules = _think_rules(thinking, starts_in_reasoning)
        return _top_level(f"start: {opening}calls\n{lark}{rules}", schemas)

    return GrammarLogitsProcessor(cache.get(key, grammar_fn), cache, "tool call")


def make_tool_call_or_answer_processor(tokenizer: Tokenizer, tools: Sequence[Mapping[str, Any]], fmt: AnswerFormat,
                                       *, parallel_tool_calls: bool = False, thinking: bool = False,
                                       starts_in_reasoning: bool = False,
                                       whitespace_pattern: str | None = None) -> LogitsProcessor:
    """tool_choice "auto" with an answer format (response_format and tools in one request): the output is either
    tool calls of any of the tools (as make_tool_call_processor) or an answer of `fmt` (as make_answer_processor),
    as OpenAI's API lets the model choose; the format binds the answer, not whether there is one. The format alone
    would rule every call out (vLLM's behaviour, its issue 39929: DSPy's JSONAdapter with tools and the Agents
    SDK's output_type with tools send both). Arguments are held to their tool's schema, as in a forced call."""
    functions = _tool_functions(tools)
    names = list(functions)
    cache = _cache_for(tokenizer)
    key = json.dumps(["tools|answer", [[n, functions[n]] for n in names], fmt.kind, fmt.spec, parallel_tool_calls,
                      thinking, starts_in_reasoning, whitespace_pattern], sort_keys=True)

    def grammar_fn() -> str:
        lark, schemas = _call_rules(functions, names, parallel_tool_calls, whitespace_pattern)
        schemas["answer"] = _checked_answer(cache, fmt, whitespace_pattern)
        opening, rules = _think_rules(thinking, starts_in_reasoning)
        return _top_level(f"start: {opening}(calls | @answer)\n{lark}{rules}", schemas)

    return GrammarLogitsProcessor(cache.get(key, grammar_fn, _what(fmt)), cache, "tool call or answer")


def _call_rules(functions: Mapping[str, Any], names: Sequence[str], parallel_tool_calls: bool,
                whitespace_pattern: str | None) -> tuple[str, dict[str, Any]]:
    """The Lark rules of `calls` (one Qwen3 tool call of one of `names`, or with parallel_tool_calls one or more
    separated by a newline), and the arguments' schemas they reference."""
    schemas: dict[str, Any] = {}
    for i, name in enumerate(names):
        try:
            schemas[f"arguments_{i}"] = {"json_schema": _checked_schema(_strict_schema(functions[name]),
                                                                        whitespace_pattern)}
        except StructuredOutputError as exc:  # say which tool's: the request may have many
            raise StructuredOutputError(f"function {name!r}: {exc}") from None
    calls = "call (\"\\n\" call)*" if parallel_tool_calls else "call"
    lark = [f"calls: {calls}", "call: " + " | ".join(f"call_{i}" for i in range(len(names)))]
    for i, name in enumerate(names):
        begin = TOOL_CALL_PREFIX + json.dumps(name, ensure_ascii=False) + TOOL_CALL_ARGUMENTS
        lark.append(f"call_{i}: {_lark_string(begin)} @arguments_{i} {_lark_string(TOOL_CALL_SUFFIX)}")
    return "\n".join(lark) + "\n", schemas
