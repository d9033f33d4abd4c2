"""--chat-template (serve, run-batch, chat, generate), as vLLM's and llama.cpp's: a Jinja template, from a file or
given inline, used instead of the checkpoint's; a checkpoint that has none becomes chat-capable with it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest

from server_utils import BackgroundServer
from qwenstack.chat_template import ChatTemplateError, read_chat_template
from qwenstack.cli import build_parser, discover_commands, main
from qwenstack.serving.app import create_app
from qwenstack.serving.config import ModelSpec, ServerConfig
from qwenstack.serving.served import load_served_model
from qwenstack.tokenizer import Tokenizer

TEMPLATE = ("{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
SMALL = ["--kv-cache-memory", "8MiB", "--dtype", "float32", "--device", "cpu"]


@pytest.fixture(scope="module")
def untemplated(tiny_qwen3: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint with its chat template taken out of tokenizer_config.json."""
    path = tmp_path_factory.mktemp("untemplated") / "model"
    shutil.copytree(tiny_qwen3, path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    for name in ("chat_template.jinja", "chat_template.json"):
        (path / name).unlink(missing_ok=True)
    return path


def test_a_file_or_the_template_itself(tmp_path: Path) -> None:
    file = tmp_path / "t.jinja"
    file.write_text(TEMPLATE)
    assert read_chat_template(str(file)) == read_chat_template(TEMPLATE) == TEMPLATE
    with pytest.raises(ChatTemplateError, match="no such file, and not a Jinja template"):
        read_chat_template(str(tmp_path / "missing.jinja"))
    with pytest.raises(ChatTemplateError, match="does not compile"):
        read_chat_template("{% for m in messages %}")


def test_serve_reads_it_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from qwenstack.commands.serve import serve_config_from_args

    file = tmp_path / "t.jinja"
    file.write_text(TEMPLATE)
    args = build_parser(discover_commands()[0]).parse_args(["serve", "some/model", "--chat-template", str(file)])
    assert serve_config_from_args(args)["models"][0]["chat_template"] == TEMPLATE
    assert main(["serve", "some/model", "--chat-template", str(tmp_path / "nope.jinja")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_a_checkpoint_without_a_template_chats_with_the_one_given(untemplated: Path) -> None:
    tok = Tokenizer.from_dir(untemplated)
    messages = [{"role": "user", "content": "Hello"}]
    with_template = load_served_model(ModelSpec(model=str(untemplated), name="given", dtype="float32", device="cpu",
                                                chat_template=TEMPLATE), 2**22)
    without = load_served_model(ModelSpec(model=str(untemplated), name="none", dtype="float32", device="cpu"), 2**22)
    with BackgroundServer(create_app([with_template, without], ServerConfig(enable_ui=False))) as srv:
        ids = httpx.post(srv.url + "/tokenize", json={"model": "given", "messages": messages}).json()["tokens"]
        assert ids == tok.encode("USER: Hello\nASSISTANT:")
        chat = {"messages": messages, "max_tokens": 3}
        assert httpx.post(srv.url + "/v1/chat/completions", json={"model": "given", **chat}).status_code == 200
        refused = httpx.post(srv.url + "/v1/chat/completions", json={"model": "none", **chat})
        assert refused.status_code == 400 and "no chat template" in refused.json()["error"]["message"]


def test_generate_renders_with_it(untemplated: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["generate", str(untemplated), "Hello", "--chat", "--json", "--max-tokens", "2", *SMALL]
    assert main([*argv, "--chat-template", TEMPLATE]) == 0
    record = json.loads(capsys.readouterr().out)[0]
    assert record["prompt_tokens"] == len(Tokenizer.from_dir(untemplated).encode("USER: Hello\nASSISTANT:"))
    assert main(argv) == 1  # no template of its own
