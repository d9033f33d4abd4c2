"""The tokenizer of a checkpoint: tokenizer.json through the `tokenizers` library, plus what
tokenizer_config.json, generation_config.json and chat_template.jinja say (special tokens, template)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as RustTokenizer

from qwenstack.chat_template import render_chat
from qwenstack.errors import ConfigError

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")
LONG_TEXT = 20_000  # characters; longer texts are tokenized without holding the GIL


class TooManyTokens(ValueError):
    def __init__(self, count: int) -> None:
        super().__init__(f"the text has {count} tokens")
        self.count = count


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # AddedToken serialised as a dict
        return value.get("content")
    return value


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from None
    return data if isinstance(data, dict) else {}


def longest_token_chars(tokenizer: "Tokenizer") -> int:
    """The most characters one vocabulary entry spells (a byte-level entry spells one byte per character, so
    this bounds the decoded text too): a text longer than a context times this (times 4, for any decoding)
    cannot fit it, known without tokenizing."""
    return max((len(t) for t in tokenizer.backend.get_vocab(with_added_tokens=True)), default=1)


@dataclass
class Tokenizer:
    backend: RustTokenizer
    chat_template: str | None
    special_tokens: dict[str, str] = field(default_factory=dict)  # bos_token, eos_token, ... as text
    eos_token_ids: list[int] = field(default_factory=list)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "Tokenizer":
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise ConfigError(f"no tokenizer.json in {model_dir}")
        try:
            backend = RustTokenizer.from_file(str(path))
        except Exception as exc:
            raise ConfigError(f"{path} could not be loaded: {exc}") from None
        config = _read_json(model_dir / "tokenizer_config.json")
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: take "default"
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        jinja_file = model_dir / "chat_template.jinja"
        if jinja_file.is_file():  # as in transformers: the template's own file wins over tokenizer_config.json's
            template = jinja_file.read_text(encoding="utf-8")
        if template is None:  # vision-language checkpoints (Qwen3-VL) keep it in the processor's file
            template = _read_json(model_dir / "chat_template.json").get("chat_template")
        special = {k: t for k in SPECIAL_TOKEN_KEYS if (t := _token_text(config.get(k))) is not None}
        eos_ids: list[int] = []

        def add_eos(value: Any) -> None:
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, int) and v not in eos_ids:
                    eos_ids.append(v)

        add_eos(_read_json(model_dir / "generation_config.json").get("eos_token_id"))
        add_eos(_read_json(model_dir / "config.json").get("eos_token_id"))
        if "eos_token" in special:
            add_eos(backend.token_to_id(special["eos_token"]))
        return cls(backend, template, special, eos_ids)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False, max_tokens: int | None = None) -> list[int]:
        """The text's token ids. With max_tokens, a longer result raises TooManyTokens before its ids become a
        Python list (a million ids take ~60 ms of GIL to build)."""
        if len(text) > LONG_TEXT:  # the batch call releases the GIL: other threads run while it works
            encoding = self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0]
        else:
            encoding = self.backend.encode(text, add_special_tokens=add_special_tokens)
        if max_tokens is not None and len(encoding) > max_tokens:
            raise TooManyTokens(len(encoding))
        return encoding.ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        if len(ids) > LONG_TEXT // 4:
            return self.backend.decode_batch([ids], skip_special_tokens=skip_special_tokens)[0]
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """The conversation rendered by the checkpoint's template, or by `chat_template` (a template's source)."""
        template = chat_template if chat_template is not None else self.chat_template
        if template is None:
            raise ConfigError("this checkpoint has no chat template (tokenizer_config.json chat_template)")
        return render_chat(
            template, messages, tools=tools, add_generation_prompt=add_generation_prompt,
            special_tokens=self.special_tokens, **kwargs,
        )
