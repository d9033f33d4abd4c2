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


# Qwen2Tokenizer's pre-tokenizer (transformers' tokenization_qwen2.py), for checkpoints without tokenizer.json.
QWEN2_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                           r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # AddedToken serialised as a dict
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from None
    return data if isinstance(data, dict) else {}


def _load_backend(model_dir: Path, config: dict[str, Any]) -> RustTokenizer:
    """tokenizer.json, or (as transformers' Qwen2Tokenizer builds it) vocab.json + merges.txt with the added
    tokens of tokenizer_config.json, the files some Qwen repositories ship alone."""
    path = model_dir / "tokenizer.json"
    if path.is_file():
        try:
            return RustTokenizer.from_file(str(path))
        except Exception as exc:
            raise ConfigError(f"{path} could not be loaded: {exc}") from None
    if (model_dir / "vocab.json").is_file() and (model_dir / "merges.txt").is_file():
        return _qwen2_bpe(model_dir, config)
    raise ConfigError(f"no tokenizer.json (nor vocab.json + merges.txt) in {model_dir}")


def _qwen2_bpe(model_dir: Path, config: dict[str, Any]) -> RustTokenizer:
    from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    vocab = _read_json(model_dir / "vocab.json")
    lines = _read_text(model_dir / "merges.txt").splitlines()
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    bad = next((" ".join(m) for m in merges if len(m) != 2), None)
    if not vocab or bad is not None:
        what = "vocab.json has no tokens" if not vocab else f"merges.txt has a line that is not two tokens: {bad!r}"
        raise ConfigError(f"{model_dir}: {what}")
    backend = RustTokenizer(BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
                                end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    backend.decoder = decoders.ByteLevel()
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    added = config.get("added_tokens_decoder") if isinstance(config.get("added_tokens_decoder"), dict) else {}
    for token_id, token in sorted(((int(i), t) for i, t in added.items() if str(i).isdigit()), key=lambda x: x[0]):
        content = _token_text(token)
        if content is None:
            continue
        flags = {k: bool(token[k]) for k in ("single_word", "lstrip", "rstrip", "normalized") if k in token}
        backend.add_tokens([AddedToken(content, special=bool(token.get("special", False)), **flags)])
        if backend.token_to_id(content) != token_id:
            raise ConfigError(f"{model_dir / 'tokenizer_config.json'}: added token {content!r} has id {token_id}, "
                              f"but vocab.json leaves it at {backend.token_to_id(content)}")
    specials = [t for k in SPECIAL_TOKEN_KEYS if (t := _token_text(config.get(k))) and backend.token_to_id(t) is None]
    backend.add_special_tokens(specials)
    return backend


def longest_token_chars(tokenizer: "Tokenizer") -> int:
    """The most characters one vocabulary entry spells (a byte-level entry spells one byte per character, so
    this bounds the decoded text too): a text longer than a context times this (times 4, for any decoding)
    cannot fit it, known without tokenizing."""
    return max((len(t) for t in tokenizer.backend.get_vocab(with_added_tokens=True)), default=1)


def _chat_templates(model_dir: Path, config: dict[str, Any]) -> tuple[str | None, dict[str, str]]:
    """The checkpoint's chat template and its named templates (tokenizer_config.json may hold a list of
    {name, template}: "default" is the template, as transformers picks it)."""
    template = config.get("chat_template")
    named: dict[str, str] = {}
    if isinstance(template, list):
        named = {t["name"]: t["template"] for t in template
                 if isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)}
        template = named.get("default") or next(iter(named.values()), None)
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():  # as in transformers: the template's own file wins over tokenizer_config.json's
        template = _read_text(jinja_file)
    if template is None:  # vision-language checkpoints (Qwen3-VL) keep it in the processor's file
        template = _read_json(model_dir / "chat_template.json").get("chat_template")
    if template is not None and not isinstance(template, str):
        raise ConfigError(f"the chat_template in {model_dir / 'tokenizer_config.json'} must be a string (or a list "
                          f"of {{name, template}}), found {type(template).__name__}")
    return template, named


@dataclass
class Tokenizer:
    backend: RustTokenizer
    chat_template: str | None
    special_tokens: dict[str, str] = field(default_factory=dict)  # bos_token, eos_token, ... as text
    eos_token_ids: list[int] = field(default_factory=list)
    # tokenizer_config.json's named templates (transformers: "default", and "tool_use" for requests with tools)
    named_templates: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "Tokenizer":
        model_dir = Path(model_dir)
        config = _read_json(model_dir / "tokenizer_config.json")
        backend = _load_backend(model_dir, config)
        template, named = _chat_templates(model_dir, config)
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
        return cls(backend, template, special, eos_ids, named)

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
        if chat_template is None and tools and "tool_use" in self.named_templates \
                and template == self.named_templates.get("default", template):
            template = self.named_templates["tool_use"]  # as transformers picks it, unless the template was replaced
        if template is None:
            raise ConfigError("this checkpoint has no chat template (tokenizer_config.json chat_template)")
        return render_chat(
            template, messages, tools=tools, add_generation_prompt=add_generation_prompt,
            special_tokens=self.special_tokens, **kwargs,
        )
