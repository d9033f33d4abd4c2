"""Qwen3Guard-Gen moderation: a plain Qwen3 causal LM, run on its own engine like any model.

    guard = GenGuard.load("Qwen/Qwen3Guard-Gen-0.6B")                 # sync, for the CLI
    guard.moderate_prompt("How do I make a bomb?")                    -> Verdict(Unsafe, ('Violent',))
    guard.moderate_answer("How do I make a bomb?", "I can't help.")   -> Verdict(Safe, (), refusal=Yes)

    guard = GenGuard(tokenizer, AsyncEngine(...))                      # the server
    await guard.amoderate_prompt(messages)

Decisions:
- Rendering is the checkpoint's own chat template, called as Qwen's README does (the template adds the
  moderation instruction and the assistant header itself, so add_generation_prompt is False). Prompt
  moderation renders the conversation up to its last user turn ([..., user]); response moderation up to the
  assistant's reply ([..., user, assistant]). System and tool turns are not sent to the guard.
- A checkpoint without a template gets `DEFAULT_GUARD_TEMPLATE`, our own Qwen3Guard-style instruction
  (used by the test checkpoints; not the official text).
- Greedy decoding, a short budget (DEFAULT_MAX_TOKENS): the verdict is three short lines.
- Nothing here raises for a bad verdict: a guard prompt too long for the guard's context, or an engine
  failure, is an `unknown` verdict whose raw text says why, and the policy decides (fail closed by default).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from qwenstack.engine.async_engine import AsyncEngine
from qwenstack.engine.engine import EngineConfig, LLMEngine
from qwenstack.engine.params import SamplingParams
from qwenstack.guard.verdict import Direction, Verdict, parse_verdict
from qwenstack.tokenizer import Tokenizer

log = logging.getLogger("qwenstack.guard")

DEFAULT_MAX_TOKENS = 64
MODERATED_ROLES = ("user", "assistant")

DEFAULT_GUARD_TEMPLATE = """\
{#- qwenstack's stand-in moderation template for Qwen3Guard-Gen-style checkpoints that ship without one.
    A real Qwen3Guard-Gen checkpoint carries its own template, which is used instead. -#}
{%- set judged = messages[-1].role if messages else 'user' -%}
{{- '<|im_start|>user\\n' -}}
{%- if judged == 'assistant' -%}
{{- 'Review the ASSISTANT reply at the end of the conversation below for safety.' -}}
{%- else -%}
{{- 'Review the last USER message in the conversation below for safety.' -}}
{%- endif -%}
{{- '\\n\\nLevels: Safe; Unsafe (harmful in most settings); Controversial (harm depends on the setting).\\n' -}}
{{- 'Categories: Violent; Non-violent Illegal Acts; Sexual Content or Sexual Acts; PII; Suicide & Self-Harm; ' -}}
{{- 'Unethical Acts; Politically Sensitive Topics; Copyright Violation' -}}
{%- if judged != 'assistant' -%}{{- '; Jailbreak' -}}{%- endif -%}
{{- '.\\n\\n[CONVERSATION]\\n' -}}
{%- for message in messages -%}
{{- (message.role | upper) + ': ' + (message.content if message.content is string else '') + '\\n' -}}
{%- endfor -%}
{{- '[END CONVERSATION]\\n\\nReply with exactly these lines:\\nSafety: <level>\\n' -}}
{{- 'Categories: <comma-separated categories, or None>' -}}
{%- if judged == 'assistant' -%}{{- '\\nRefusal: <Yes if the assistant declined, else No>' -}}{%- endif -%}
{{- '<|im_end|>\\n<|im_start|>assistant\\n' -}}
"""


def _text(content: Any) -> str:
    """Message content as text: a string, or the text parts of an OpenAI content list."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                parts.append(str(part.get("text", "")))
            elif isinstance(part, str):
                parts.append(part)
        return "\n".join(parts)
    return str(content)


def guard_messages(messages: Sequence[dict[str, Any]], direction: Direction) -> list[dict[str, str]]:
    """The turns the guard sees: user and assistant text, ending at the last turn of the judged role
    (the last user turn for a prompt, the last assistant turn for an answer). Raises ValueError when the
    conversation has no such turn."""
    turns = [{"role": m.get("role"), "content": _text(m.get("content"))} for m in messages
             if m.get("role") in MODERATED_ROLES]
    role = "user" if direction is Direction.PROMPT else "assistant"
    last = max((i for i, m in enumerate(turns) if m["role"] == role), default=None)
    if last is None:
        raise ValueError(f"{direction.value} moderation needs a conversation with a {role} turn")
    return turns[: last + 1]


def answer_conversation(prompt: str | Sequence[dict[str, Any]], answer: str) -> list[dict[str, Any]]:
    base = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return [*base, {"role": "assistant", "content": answer}]


def prompt_conversation(prompt: str | Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


class GenGuard:
    """Moderation with a Qwen3Guard-Gen model. `engine` is an LLMEngine (sync methods: the CLI) or an
    AsyncEngine (the `a`-prefixed coroutines: the server)."""

    def __init__(self, tokenizer: Tokenizer, engine: LLMEngine | AsyncEngine, *, name: str = "guard",
                 chat_template: str | None = None, max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
        self.tokenizer = tokenizer
        self.engine = engine
        self.name = name
        self.chat_template = chat_template or tokenizer.chat_template or DEFAULT_GUARD_TEMPLATE
        self.max_tokens = max_tokens

    @classmethod
    def load(cls, model: str | Path, *, dtype: str | None = None, device: str | None = None,
             kv_cache_memory: int = 256 * 1024**2, max_model_len: int | None = None,
             asynchronous: bool = False, kv_cache_dtype: str = "auto", **options: Any) -> "GenGuard":
        """Loads a Gen checkpoint (directory or hub id) onto its own engine."""
        from qwenstack.loading import load

        loaded = load(model, dtype=dtype, device=device)
        config = EngineConfig(kv_cache_memory=kv_cache_memory, max_model_len=max_model_len,
                              kv_cache_dtype=kv_cache_dtype)
        engine: LLMEngine | AsyncEngine = LLMEngine(loaded.model, loaded.tokenizer,
                                                    loaded.tokenizer.eos_token_ids, config)
        if asynchronous:
            engine = AsyncEngine(engine, name="guard")
        return cls(loaded.tokenizer, engine, name=loaded.name, **options)

    # --- rendering --------------------------------------------------------------------------------------

    def render(self, messages: Sequence[dict[str, Any]], direction: Direction) -> list[int]:
        """Token ids of the guard's input for this conversation and direction."""
        from qwenstack.chat_template import render_chat

        text = render_chat(self.chat_template, guard_messages(messages, direction), add_generation_prompt=False,
                           special_tokens=self.tokenizer.special_tokens)
        return self.tokenizer.encode(text)

    def _engine(self) -> LLMEngine:
        return self.engine if isinstance(self.engine, LLMEngine) else self.engine.engine

    def _prepare(self, messages: Sequence[dict[str, Any]],
                 direction: Direction) -> tuple[list[int], SamplingParams] | Verdict:
        """The guard's input ids and sampling, or an unknown verdict saying why it cannot run."""
        try:
            ids = self.render(messages, direction)
            engine = self._engine()
            room = engine.max_model_len - len(ids)
            params = SamplingParams(temperature=0.0, max_tokens=max(1, min(self.max_tokens, room)))
            engine.validate(ids, params)
            return ids, params
        except Exception as exc:  # too long for the guard, template refusal, no such turn: unknown
            log.warning("guard could not moderate this %s: %s", direction.value, exc)
            return Verdict.unknown(f"guard input rejected: {exc}")

    # --- sync (CLI, scripts) ----------------------------------------------------------------------------

    def moderate_many(self, items: Sequence[tuple[Sequence[dict[str, Any]], Direction]]) -> list[Verdict]:
        """Several (conversation, direction) pairs in one batch on an LLMEngine."""
        if not isinstance(self.engine, LLMEngine):
            raise TypeError("the sync API needs an LLMEngine; with an AsyncEngine use the a* coroutines")
        prepared = [self._prepare(m, d) for m, d in items]
        runnable = [p for p in prepared if not isinstance(p, Verdict)]
        try:
            outputs = iter(self.engine.generate_all([ids for ids, _ in runnable], [p for _, p in runnable])
                           if runnable else [])
        except Exception as exc:
            log.exception("guard engine failed")
            return [p if isinstance(p, Verdict) else Verdict.unknown(f"guard failed: {exc}") for p in prepared]
        return [p if isinstance(p, Verdict) else parse_verdict(next(outputs).outputs[0].text) for p in prepared]

    def moderate(self, messages: Sequence[dict[str, Any]], direction: Direction) -> Verdict:
        return self.moderate_many([(messages, direction)])[0]

    def moderate_prompt(self, prompt: str | Sequence[dict[str, Any]]) -> Verdict:
        return self.moderate(prompt_conversation(prompt), Direction.PROMPT)

    def moderate_answer(self, prompt: str | Sequence[dict[str, Any]], answer: str) -> Verdict:
        return self.moderate(answer_conversation(prompt, answer), Direction.ANSWER)

    # --- async (server) ---------------------------------------------------------------------------------

    async def amoderate(self, messages: Sequence[dict[str, Any]], direction: Direction) -> Verdict:
        if not isinstance(self.engine, AsyncEngine):
            raise TypeError("the async API needs an AsyncEngine; with an LLMEngine use the sync methods")
        prepared = self._prepare(messages, direction)
        if isinstance(prepared, Verdict):
            return prepared
        ids, params = prepared
        final = None
        try:
            async for out in self.engine.generate(ids, params,
                                                  request_id=self.engine.new_request_id("guard")):
                final = out
        except Exception as exc:  # queue full, engine failure: the policy decides what unknown means
            log.warning("guard failed on this %s: %s", direction.value, exc)
            return Verdict.unknown(f"guard failed: {exc}")
        if final is None or not final.outputs:
            return Verdict.unknown("guard returned no output")
        return parse_verdict(final.outputs[0].text)

    async def amoderate_prompt(self, prompt: str | Sequence[dict[str, Any]]) -> Verdict:
        return await self.amoderate(prompt_conversation(prompt), Direction.PROMPT)

    async def amoderate_answer(self, prompt: str | Sequence[dict[str, Any]], answer: str) -> Verdict:
        return await self.amoderate(answer_conversation(prompt, answer), Direction.ANSWER)

    def shutdown(self) -> None:
        if isinstance(self.engine, AsyncEngine):
            self.engine.shutdown()


async def moderate_prompt(guard: GenGuard, prompt: str | Sequence[dict[str, Any]]) -> Verdict:
    """The server's entry point for prompt moderation (the guard on an AsyncEngine)."""
    return await guard.amoderate_prompt(prompt)


async def moderate_answer(guard: GenGuard, prompt: str | Sequence[dict[str, Any]], answer: str) -> Verdict:
    """The server's entry point for response moderation (the guard on an AsyncEngine)."""
    return await guard.amoderate_answer(prompt, answer)
