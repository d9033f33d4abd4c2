"""Tokenizer files as real repositories ship them: vocab.json + merges.txt without tokenizer.json, named chat
templates, `{% generation %}` blocks, and broken files refused by name."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qwenstack.chat_template import render_chat
from qwenstack.errors import ConfigError
from qwenstack.tokenizer import Tokenizer

TEXTS = ["Hello world!  It's 2024\n\n\tdone", "<|im_start|>user\nhi<think>x</think><|im_end|>",
         "Ünïcödé: héllo 你好，世界 🚀✨ cafe\u0301", "don't  I'LL 12345 \r\n x   "]


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_tokenizer_config(path: Path, **changes: object) -> None:
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.update(changes)
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def as_vocab_and_merges(path: Path) -> None:
    """The tokenizer as vocab.json + merges.txt, its added tokens in tokenizer_config.json (Qwen2Tokenizer's files)."""
    tok = json.loads((path / "tokenizer.json").read_text())
    (path / "vocab.json").write_text(json.dumps(tok["model"]["vocab"], ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    keys = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
    edit_tokenizer_config(path, tokenizer_class="Qwen2Tokenizer",
                          added_tokens_decoder={str(t["id"]): {k: t[k] for k in keys} for t in tok["added_tokens"]})
    (path / "tokenizer.json").unlink()


def test_vocab_and_merges_without_tokenizer_json_load_as_transformers_does(tmp_path: Path, tiny_qwen3: Path) -> None:
    """Was: "no tokenizer.json". transformers builds Qwen2Tokenizer from these files; the ids and texts agree."""
    from transformers import AutoTokenizer

    folder = copy_of(tiny_qwen3, tmp_path / "vm")
    as_vocab_and_merges(folder)
    ours, ref = Tokenizer.from_dir(folder), AutoTokenizer.from_pretrained(folder)
    assert ours.vocab_size == len(ref)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    assert ours.eos_token_ids == [ours.token_to_id("<|im_end|>")]


def test_odd_tokenizer_config_values_are_read_or_named(tmp_path: Path, tiny_qwen3: Path) -> None:
    folder = copy_of(tiny_qwen3, tmp_path / "odd")
    edit_tokenizer_config(folder, eos_token=2)  # not a token's text: ignored (was a TypeError)
    assert Tokenizer.from_dir(folder).special_tokens.get("eos_token") is None
    edit_tokenizer_config(folder, chat_template=3)
    with pytest.raises(ConfigError, match=r"chat_template in .*tokenizer_config.json must be a string"):
        Tokenizer.from_dir(folder)
    edit_tokenizer_config(folder, chat_template="{{ messages }}")
    (folder / "chat_template.jinja").write_bytes(b"\xff\xfe{{ x }}")
    with pytest.raises(ConfigError, match=r"cannot read .*chat_template.jinja: 'utf-8' codec"):
        Tokenizer.from_dir(folder)


def test_named_templates_pick_tool_use_for_tools(tmp_path: Path, tiny_qwen3: Path) -> None:
    """A list of named templates: "default", and "tool_use" for a request with tools, as transformers picks them;
    a template given in its place wins over both."""
    folder = copy_of(tiny_qwen3, tmp_path / "named")
    edit_tokenizer_config(folder, chat_template=[{"name": "default", "template": "D{{ messages|length }}"},
                                                 {"name": "tool_use", "template": "T{{ tools|length }}"}])
    tok = Tokenizer.from_dir(folder)
    messages = [{"role": "user", "content": "hi"}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    assert tok.apply_chat_template(messages) == "D1"
    assert tok.apply_chat_template(messages, tools=tools) == "T1"
    tok.chat_template = "X"  # --chat-template
    assert tok.apply_chat_template(messages, tools=tools) == "X"


def test_generation_blocks_render_as_in_transformers() -> None:
    """`{% generation %}` (transformers' assistant-mask marker) failed to compile: every chat request was a 400."""
    from transformers.utils.chat_template_utils import render_jinja_template

    template = ("{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}"
                "{% endgeneration %}{% else %}<{{ m.content }}>{% endif %}{% endfor %}")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    expected = render_jinja_template(conversations=[messages], chat_template=template)[0][0]
    assert render_chat(template, messages) == expected == "<hi>yo"


def test_a_template_that_does_not_compile_says_so() -> None:
    """Was "could not render this conversation", as if the request were at fault."""
    from qwenstack.chat_template import ChatTemplateError

    with pytest.raises(ChatTemplateError, match=r"the chat template does not compile \(line 1: .*--chat-template"):
        render_chat("{% for m in messages %}{{ m.content }}{% if %}", [{"role": "user", "content": "hi"}])
    with pytest.raises(ChatTemplateError, match=r"could not render this conversation: needs a system message"):
        render_chat("{{ raise_exception('needs a system message') }}", [{"role": "user", "content": "hi"}])
