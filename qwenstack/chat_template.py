"""Chat templates rendered with jinja2 under Hugging Face semantics.

transformers renders templates in an immutable sandbox with trim_blocks and lstrip_blocks, the
loopcontrols extension and `{% generation %}` blocks, a `tojson` that does not escape HTML, `raise_exception`
and `strftime_now`, and passes the tokenizer's special tokens as variables. Reasoning given as `reasoning` or
`thinking` is also exposed as `reasoning_content`. We do the same so a checkpoint's own template renders
byte-identically.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError):
    """The template refused the conversation (raise_exception) or failed to render."""


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def cut_after_final_message(rendered: str, content: Any) -> str | None:
    """The rendered conversation cut right after the last message's text (vLLM's continue_final_message): the
    template's end of turn and anything after it go. The template may have stripped the text's ends. None when
    the text is not found (no text to continue)."""
    text = content if isinstance(content, str) else ""
    for candidate in (text, text.strip()):
        at = rendered.rfind(candidate) if candidate else -1
        if at >= 0:
            return rendered[:at + len(candidate)]
    return None


def read_chat_template(value: str) -> str:
    """A --chat-template value (vLLM's and llama.cpp's option): a file holding the template, or the template
    itself; checked by compiling it. Raises ChatTemplateError (a ValueError: the CLI prints it on one line)."""
    from pathlib import Path

    path = Path(value).expanduser()
    looks_like_template = "{{" in value or "{%" in value
    try:
        is_file = not looks_like_template and path.is_file()
    except OSError:  # a name too long for the file system: it is not a file
        is_file = False
    if is_file:
        source = path.read_text(encoding="utf-8")
    elif looks_like_template:
        source = value
    else:
        raise ChatTemplateError(f"--chat-template {value!r}: no such file, and not a Jinja template either")
    try:
        compile_template(source)
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"--chat-template: the template does not compile: {exc}") from None
    return source


class GenerationBlocks(Extension):
    """`{% generation %}...{% endgeneration %}`, transformers' marker of assistant text (for training masks):
    rendered as its body alone, as transformers renders it when no mask is asked for."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _body(caller: Any) -> str:
        return caller()


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols", GenerationBlocks])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _alias_reasoning(message: dict[str, Any]) -> dict[str, Any]:
    reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return dict(message)
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _normalise_tool(tool: dict[str, Any]) -> dict[str, Any]:
    # transformers accepts bare function schemas too and wraps them.
    if "type" not in tool and "name" in tool:
        return {"type": "function", "function": tool}
    return tool


def render_chat(
    template: str,
    messages: list[dict[str, Any]],
    *,
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    special_tokens: dict[str, str] | None = None,
    **kwargs: Any,
) -> str:
    """Renders a conversation; extra keyword arguments (enable_thinking, ...) are template variables."""
    context = dict(special_tokens or {})
    context.update(kwargs)
    try:
        compiled = compile_template(template)
    except jinja2.exceptions.TemplateSyntaxError as exc:  # the template's fault, whatever the conversation
        raise ChatTemplateError(f"the chat template does not compile (line {exc.lineno}: {exc.message}); "
                                f"give the server a working one with --chat-template") from None
    try:
        return compiled.render(
            messages=[_alias_reasoning(m) for m in messages],
            tools=None if tools is None else [_normalise_tool(t) for t in tools],
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **context,
        )
    except jinja2.exceptions.TemplateError as exc:
        raise ChatTemplateError(f"the chat template could not render this conversation: {exc}") from None
