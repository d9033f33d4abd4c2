"""The `qwenstack` command line: every subcommand's --help, generate and chat on a tiny checkpoint, chat's
thinking fold and commands, models on an empty and a populated cache, bench serve against a fake server."""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, AsyncIterator, Iterator

import httpx
import pytest

from server_utils import free_port
from qwenstack.cli import build_parser, discover_commands, main
from qwenstack.commands._common import parse_bytes

REPO = Path(__file__).resolve().parents[2]
SMALL_KV = ["--kv-cache-memory", "8MiB", "--dtype", "float32", "--device", "cpu"]


def command_paths() -> list[list[str]]:
    commands, _ = discover_commands()
    return [[c.group, c.name] if c.group else [c.name] for c in commands]


# --- the parser ----------------------------------------------------------------------------------------------


def test_every_command_module_imports() -> None:
    commands, errors = discover_commands()
    assert errors == []
    names = {" ".join(p) for p in command_paths()}
    assert {"serve", "chat", "generate", "models", "bench serve"} <= names


@pytest.mark.parametrize("path", [[]] + [["bench"]] + command_paths(), ids=lambda p: " ".join(p) or "qwenstack")
def test_help(path: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(path + ["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: qwenstack" + "".join(f" {p}" for p in path))


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    assert "commands:" in capsys.readouterr().out


def test_registry_builds_groups_from_commands() -> None:
    from qwenstack.commands import Command

    # Names no real command uses (bench report and plan exist now).
    extra = [Command("fake-summary", "summarise runs", lambda p: p.add_argument("--x"), lambda a: 7, group="bench"),
             Command("fake-estimate", "plan memory", lambda p: None, lambda a: None)]
    commands, _ = discover_commands()
    parser = build_parser(commands + extra)
    args = parser.parse_args(["bench", "fake-summary", "--x", "1"])
    assert args._command.name == "fake-summary" and args.x == "1" and args._command.run(args) == 7
    assert parser.parse_args(["fake-estimate"])._command.name == "fake-estimate"
    assert parser.parse_args(["bench", "serve"])._command.group == "bench"
    # `qwenstack run MODEL`, what an Ollama user types first, is chat (it was "invalid choice")
    assert parser.parse_args(["run", "some-model"])._command.name == "chat"


@pytest.mark.parametrize("text, expected", [("2GiB", 2 * 1024**3), ("512MiB", 512 * 1024**2),
                                            ("1.5G", 3 * 1024**3 // 2), ("2GB", 2 * 10**9), ("1048576", 1048576),
                                            ("64k", 65536)])
def test_parse_bytes(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "2 parsecs", "-1G", "0"])
def test_parse_bytes_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_bytes(text)


def test_bad_argument_is_one_line_not_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--kv-cache-memory", "lots"])
    assert exit_info.value.code == 2
    assert "'lots' is not a size" in capsys.readouterr().err


def test_a_mistyped_flag_shows_the_subcommands_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--max-tokns", "5", "hi"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "usage: qwenstack generate" in err and "--max-tokns" in err


def test_the_demo_model_answers_to_the_names_it_is_listed_under() -> None:
    from qwenstack.resolve import DEMO_MODEL_DIR, DEMO_NAMES, resolve_model

    assert DEMO_NAMES == ("qwenstack-demo", "demo-model")  # `qwenstack models` lists the first, the server the second
    assert all(resolve_model(name) == DEMO_MODEL_DIR for name in DEMO_NAMES)


def test_chat_refuses_an_embedding_model_before_its_prompt(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from embedding_checkpoints import build_embedding_checkpoint

    path = build_embedding_checkpoint(tmp_path / "emb", seed=1)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    assert main(["chat", str(path)]) == 1
    assert "is an embedding model" in capsys.readouterr().err


# --- serve ---------------------------------------------------------------------------------------------------


def serve_args(*argv: str) -> argparse.Namespace:
    commands, _ = discover_commands()
    return build_parser(commands).parse_args(["serve", *argv])


def test_serve_without_model_serves_the_demo() -> None:
    from qwenstack.commands.serve import serve_config_from_args, server_config

    values = serve_config_from_args(serve_args())
    assert [m["model"] for m in values["models"]] == [None]  # qwenstack.llm.load prints DEMO_NOTICE for it
    config = server_config(values)
    assert (config.host, config.port, config.enable_ui) == ("127.0.0.1", 8000, True)


def test_serve_maps_every_option(monkeypatch: pytest.MonkeyPatch) -> None:
    from qwenstack.commands.serve import serve_config_from_args, server_config

    args = serve_args("a/m1", "/tmp/m2", "--served-model-name", "one", "--host", "0.0.0.0", "--port", "9001",
                      "--api-key", "sk-x", "--remote", "max=https://api.example.com/v1/#qwen-max",
                      "--remote-timeout", "30", "--dtype", "bfloat16", "--device", "cpu", "--max-model-len", "4096",
                      "--kv-cache-memory", "3GiB", "--quantization", "int8", "--max-num-seqs", "4",
                      "--max-num-batched-tokens", "512", "--max-waiting", "9", "--no-prefix-caching", "--seed", "5",
                      "--no-think", "--no-ui", "--ui-db", "/tmp/ui.db", "--allow-local-image-paths",
                      "--allow-remote-image-urls", "--allow-private-image-urls", "--max-request-body", "16MiB",
                      "--special-tokens-in-content", "--log-level", "debug", "--max-speech-seconds", "12.5",
                      "--allowed-origins", "https://a.example", "https://b.example")
    values = serve_config_from_args(args)
    config = server_config(values)
    assert (config.host, config.port, config.api_key, config.kv_cache_memory) == ("0.0.0.0", 9001, "sk-x", 3 * 1024**3)
    assert config.default_chat_template_kwargs == {"enable_thinking": False}
    assert (config.enable_ui, config.ui_db_path, config.allow_local_image_paths) == (False, "/tmp/ui.db", True)
    assert config.allow_remote_image_urls and not server_config(serve_config_from_args(serve_args())).allow_remote_image_urls
    assert config.allow_private_image_urls and config.special_tokens_in_content
    assert config.allowed_origins == ["https://a.example", "https://b.example"]
    assert server_config(serve_config_from_args(serve_args())).allowed_origins == []
    assert config.max_request_body_bytes == 16 * 1024**2 and config.max_speech_seconds == 12.5
    default = server_config(serve_config_from_args(serve_args()))
    assert default.max_speech_seconds == 300.0
    assert not default.allow_private_image_urls and not default.special_tokens_in_content
    assert (config.remote_timeout_s, config.log_level) == (30.0, "debug")
    [remote] = config.remote
    assert (remote.name, remote.base_url, remote.upstream_model) == ("max", "https://api.example.com/v1", "qwen-max")
    first, second = config.models
    assert (first.model, first.name, second.model, second.name) == ("a/m1", "one", "/tmp/m2", None)
    for spec in config.models:
        assert (spec.dtype, spec.device, spec.quantization, spec.max_model_len) == ("bfloat16", "cpu", "int8", 4096)
        assert (spec.max_num_seqs, spec.max_num_batched_tokens, spec.max_waiting) == (4, 512, 9)
        assert (spec.enable_prefix_caching, spec.seed) == (False, 5)
    monkeypatch.setenv("QWENSTACK_API_KEY", "from-env")
    assert server_config(serve_config_from_args(serve_args("--remote", "r=http://h:1"))).api_key == "from-env"
    assert serve_config_from_args(serve_args("--remote", "r=http://h:1"))["models"] == []  # a gateway only


@pytest.mark.parametrize("argv, message", [
    (["m", "--remote", "m=http://h/v1"], "both a local model and a --remote"),
    (["--remote", "nourl"], "NAME=BASE_URL"),
    (["--guard", "Qwen/Qwen3Guard-Gen-0.6B"], None),
    (["--speculative-tokens", "4"], None),
])
def test_serve_refuses_clearly(argv: list[str], message: str | None) -> None:
    from qwenstack.commands.serve import serve_config_from_args, server_config
    from qwenstack.errors import QwenstackError
    from qwenstack.serving.config import ModelSpec, ServerConfig

    flag = argv[0]
    if message is None:  # options the server may not implement yet: supported, or refused by name
        field = {"--guard": "guard_model", "--speculative-tokens": "speculative_tokens"}[flag]
        if field in ServerConfig.__dataclass_fields__ or field in ModelSpec.__dataclass_fields__:
            server_config(serve_config_from_args(serve_args(*argv)))
            return
        with pytest.raises(QwenstackError, match=flag):
            server_config(serve_config_from_args(serve_args(*argv)))
        return
    with pytest.raises(ValueError, match=message):
        server_config(serve_config_from_args(serve_args(*argv)))


def test_serve_runs_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
    from qwenstack.serving import app

    seen = []
    monkeypatch.setattr(app, "run_server", seen.append)
    assert main(["serve", "some/model", "--port", "8123"]) == 0
    assert seen[0].port == 8123 and seen[0].models[0].model == "some/model"


def test_a_copied_vllm_command_runs_and_says_what_its_flags_become(monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    from qwenstack.serving import app

    seen = []
    monkeypatch.setattr(app, "run_server", seen.append)
    vllm = ["--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3",
            "--trust-remote-code", "--gpu-memory-utilization", "0.9"]
    with caplog.at_level("WARNING", logger="qwenstack.serve"):
        assert main(["serve", "Qwen/Qwen3-8B", "--max-model-len", "8192", *vllm]) == 0
    assert seen[0].models[0].model == "Qwen/Qwen3-8B" and seen[0].models[0].max_model_len == 8192
    said = caplog.text
    for flag in ("--tool-call-parser", "--reasoning-parser", "--trust-remote-code", "--gpu-memory-utilization"):
        assert flag in said
    with pytest.raises(SystemExit):  # a parser for another model family: argparse's usage error
        main(["serve", "m", "--tool-call-parser", "mistral"])


def test_vllms_speculative_config_maps_to_ours() -> None:
    from qwenstack.commands.serve import serve_config_from_args, server_config

    def spec(config: str) -> Any:
        return server_config(serve_config_from_args(serve_args("m", "--speculative-config", config))).models[0]

    ngram = spec('{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 3, "prompt_lookup_min": 1}')
    assert (ngram.speculative_method, ngram.speculative_tokens, ngram.prompt_lookup_min, ngram.prompt_lookup_max) \
        == ("ngram", 5, 1, 3)
    mtp = spec('{"method": "qwen3_next_mtp", "num_speculative_tokens": 2}')
    assert (mtp.speculative_method, mtp.speculative_tokens) == ("mtp", 2)
    named = server_config(serve_config_from_args(serve_args("m", "--speculative-method", "ngram"))).models[0]
    assert (named.speculative_method, named.speculative_tokens) == ("ngram", 4)  # a method alone drafts
    for bad in ('{"method": "eagle", "num_speculative_tokens": 2}', '{"method": "ngram"}', "[1]", "{nope",
                '{"method": "ngram", "num_speculative_tokens": 0}'):
        with pytest.raises(SystemExit):
            serve_args("m", "--speculative-config", bad)


# --- generate ------------------------------------------------------------------------------------------------


def test_generate_prints_output(tiny_qwen3: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", str(tiny_qwen3), "The capital of France is", "--max-tokens", "5", "--temperature", "0",
                 *SMALL_KV]) == 0
    text = capsys.readouterr().out
    assert text.strip()
    # Options between the model and the prompt, as llama.cpp's and vLLM's CLIs take them ("unrecognized arguments")
    assert main(["generate", str(tiny_qwen3), "--max-tokens", "5", "--temperature", "0", *SMALL_KV,
                 "The capital of France is"]) == 0
    assert capsys.readouterr().out == text
    with pytest.raises(SystemExit):  # an unknown option is still one
        main(["generate", str(tiny_qwen3), "--max-tokenz", "5", "hi"])


def test_generate_file_chat_json(tiny_qwen3: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello there\n\nWhat is 2 + 2?\n")
    assert main(["generate", str(tiny_qwen3), "--file", str(prompts), "--chat", "--no-think", "--json", "--n", "2",
                 "--max-tokens", "4", "--seed", "0", "--stop", "zzz", *SMALL_KV]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["prompt"] for r in records] == ["Hello there", "Hello there", "What is 2 + 2?", "What is 2 + 2?"]
    for r in records:
        assert r["completion_tokens"] <= 4 and r["finish_reason"] in ("stop", "length")
        assert "content" in r and "reasoning_content" in r and r["prompt_tokens"] > 5


def test_generate_needs_a_prompt(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate"]) == 1
    assert "give a PROMPT" in capsys.readouterr().err


# --- chat ----------------------------------------------------------------------------------------------------


def test_chat_through_a_pipe(tiny_qwen3: Path) -> None:
    script = "Hello\n/no_think\nHow are you?\n/clear\n/exit\nnever sent\n"
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_COLOR": "1"}
    proc = subprocess.run([sys.executable, "-m", "qwenstack.cli", "chat", str(tiny_qwen3), "--max-tokens", "6",
                           "--seed", "0", *SMALL_KV], input=script, capture_output=True, text=True,
                          timeout=120, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert ">>> Hello\n" in out and "Thinking off." in out and "Cleared the conversation." in out
    reply = out.split(">>> Hello\n", 1)[1].split(">>> /no_think", 1)[0]
    assert any(c.isprintable() and not c.isspace() for c in reply.replace("[stopped at the token limit]", "")), out
    assert out.rstrip().endswith(">>> /exit") and "never sent" not in out
    assert "\x1b[" not in out  # no terminal escapes into a pipe


def test_chat_drops_the_oldest_turns_that_no_longer_fit() -> None:
    """A conversation past the context loses its oldest turns, as Ollama's does, instead of an error per message."""
    script = "".join(f"Tell me, good friend, the {n} thing you saw in fair Verona today.\n"
                     for n in ("first", "second", "third", "fourth", "fifth"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_COLOR": "1"}
    proc = subprocess.run([sys.executable, "-m", "qwenstack.cli", "chat", "--max-model-len", "128", "--max-tokens",
                           "40", "--seed", "0"], input=script, capture_output=True, text=True, timeout=120, env=env,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "oldest messages no longer fit the context" in proc.stdout and "error:" not in proc.stdout
    assert proc.stdout.count(">>> ") == 5
    # A message longer than the context alone is an error, and nothing is said to be dropped (nothing was).
    proc = subprocess.run([sys.executable, "-m", "qwenstack.cli", "chat", "--max-model-len", "128", "--max-tokens",
                           "8", "--seed", "0"], input="Hello there.\n" + "Verona " * 300 + "\n", capture_output=True,
                          text=True, timeout=120, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "error: the prompt has" in proc.stdout and "no longer fit" not in proc.stdout


class FakeEngine:
    """Streams a scripted reply, a few characters per step, and records the prompts it was given."""

    def __init__(self, tokenizer: "FakeTokenizer", replies: list[str]) -> None:
        self.tokenizer, self.replies, self.prompts = tokenizer, replies, []
        self.pending: list[str] = []

    def add_request(self, request_id: str, ids: list[int], params: Any) -> None:
        self.prompts.append(self.tokenizer.decode(ids))
        reply = self.replies[len(self.prompts) - 1]
        self.pending = [reply[i:i + 3] for i in range(0, len(reply), 3)]

    def has_unfinished_requests(self) -> bool:
        return bool(self.pending)

    def step(self) -> list[Any]:
        delta = self.pending.pop(0)
        sample = SimpleNamespace(delta_text=delta, finish_reason=None if self.pending else "stop")
        return [SimpleNamespace(outputs=[sample])]


class FakeTokenizer:
    chat_template = "fake"

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool,
                            enable_thinking: bool) -> str:
        self.messages = messages
        return json.dumps(messages) + ("" if enable_thinking else "<think>\n\n</think>\n\n")

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(map(chr, ids))


def fake_session(tmp_path: Path, replies: list[str], live: bool, **options: Any) -> tuple[Any, io.StringIO]:
    from qwenstack.commands.chat import ChatSession

    tokenizer = FakeTokenizer()
    llm = SimpleNamespace(tokenizer=tokenizer, engine=FakeEngine(tokenizer, replies),
                          loaded=SimpleNamespace(path=tmp_path))
    values = dict(no_think=False, system=None, seed=0, show_thinking=False, max_tokens=None, stop=[],
                  temperature=None, top_p=None, top_k=None, min_p=None, repetition_penalty=None, presence_penalty=None)
    values.update(options)
    out = io.StringIO()
    return ChatSession(llm, argparse.Namespace(**values), out, live=live, color=live), out


def test_chat_folds_thinking_and_keeps_it_for_show(tmp_path: Path) -> None:
    session, out = fake_session(tmp_path, ["<think>\nLet me think.\nYes.\n</think>\n\nParis.", "Berlin."], live=False,
                                system="Be brief.")
    session.reply("Capital of France?")
    text = out.getvalue()
    assert "[thought for 18 tokens — /show to expand]\n\nParis.\n" == text  # 18 = len("Let me think.\nYes.")
    assert "Let me think" not in text
    session.command("/show")
    assert out.getvalue().endswith("Let me think.\nYes.\n")
    assistant = session.messages[-1]
    assert assistant == {"role": "assistant", "content": "Paris.", "reasoning_content": "Let me think.\nYes."}
    session.command("/no_think")
    session.reply("And Germany?")
    assert session.llm.engine.prompts[-1].endswith("<think>\n\n</think>\n\n")  # thinking off reached the template
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant", "user", "assistant"]
    session.command("/clear")
    assert session.messages == [{"role": "system", "content": "Be brief."}] and session.last_reasoning is None
    assert session.command("/exit") is False


def test_chat_live_thinking_is_dimmed_then_erased(tmp_path: Path) -> None:
    session, out = fake_session(tmp_path, ["<think>\nabc\ndef\n</think>\n\nAnswer."], live=True)
    session.reply("Hi")
    text = out.getvalue()
    assert text.startswith("\x1b[2ma\x1b[0m")  # streamed dimmed, as it comes
    erase = text.index("\r\x1b[1A\x1b[J")  # back to the first thinking row, clear below
    assert text.index("[thought for") > erase and text.endswith("Answer.\n")


def test_chat_show_thinking_keeps_it(tmp_path: Path) -> None:
    session, out = fake_session(tmp_path, ["<think>\nsteps\n</think>\n\nDone."], live=False, show_thinking=True)
    session.reply("Hi")
    assert out.getvalue() == "steps\n\nDone.\n"


def test_reply_view_rows() -> None:
    from qwenstack.commands._chat_view import screen_rows

    assert screen_rows("abc", 80) == 1
    assert screen_rows("abcd\nef", 2) == 3
    assert screen_rows("你好", 2) == 2  # wide characters take two columns
    assert screen_rows("x\n", 80) == 2  # the cursor sits on the next row


def test_read_messages_multiline_and_echo() -> None:
    from qwenstack.commands.chat import is_command, read_messages

    out = io.StringIO()
    lines = list(read_messages(io.StringIO('one\n\n"""\na\nb\n"""\n/no_think please\n'), out, interactive=False))
    assert lines == ["one", "a\nb", "/no_think please"]
    assert not is_command("/no_think please") and is_command("/no_think") and is_command(" /exit ")
    assert out.getvalue().startswith(">>> one\n")


# --- models --------------------------------------------------------------------------------------------------


def test_models_with_an_empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "no-such-cache"))
    assert main(["models"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert lines[0].split()[:2] == ["NAME", "SIZE"] and lines[1].startswith("qwenstack-demo (bundled")
    assert lines[2].startswith("Hugging Face cache:") and len(lines) == 3
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    assert main(["models", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in listing["models"]] == ["qwenstack-demo"] and listing["models"][0]["bundled"]


def fake_cache_repo(cache: Path, repo_id: str, config: dict[str, Any]) -> None:
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "blobs" / "cfg").write_text(json.dumps(config))
    (repo / "snapshots" / "0123abcd" / "config.json").symlink_to("../../blobs/cfg")


def test_models_marks_qwen3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str]) -> None:
    fake_cache_repo(tmp_path, "Qwen/Qwen3-0.6B", {"model_type": "qwen3"})
    fake_cache_repo(tmp_path, "Qwen/Qwen3-30B-A3B", {"model_type": "qwen3_moe"})
    fake_cache_repo(tmp_path, "other/llama", {"model_type": "llama"})
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    assert main(["models", "--json"]) == 0
    found = {m["name"]: m for m in json.loads(capsys.readouterr().out)["models"]}
    assert found["Qwen/Qwen3-0.6B"]["qwen3"] and found["Qwen/Qwen3-30B-A3B"]["model_type"] == "qwen3_moe"
    assert not found["other/llama"]["qwen3"] and found["other/llama"]["path"].endswith("0123abcd")
    assert main(["models", "--qwen3-only"]) == 0
    assert "other/llama" not in capsys.readouterr().out


# --- bench serve ---------------------------------------------------------------------------------------------


def fake_openai_app(received: list[dict[str, Any]]) -> Any:
    """Streams exactly max_tokens one-word chunks (it honours ignore_eos by construction), then usage."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI()

    def stream(body: dict[str, Any], chat: bool) -> StreamingResponse:
        received.append(body)
        n = int(body["max_tokens"])

        async def frames() -> AsyncIterator[str]:
            await asyncio.sleep(0.01)  # "prefill"
            for i in range(n):
                piece = {"delta": {"content": f"w{i} "}} if chat else {"text": f"w{i} "}
                yield "data: " + json.dumps({"choices": [{"index": 0, **piece, "finish_reason": None}]}) + "\n\n"
                await asyncio.sleep(0.002)
            usage = {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n}
            yield "data: " + json.dumps({"choices": [], "usage": usage}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(frames(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(body: dict[str, Any]) -> Any:
        if body["model"] != "fake-model":
            return JSONResponse({"error": {"message": "no such model", "type": "invalid_request_error"}}, 404)
        return stream(body, chat=True)

    @app.post("/v1/completions")
    async def completions(body: dict[str, Any]) -> Any:
        return stream(body, chat=False)

    @app.get("/v1/models")
    async def models() -> Any:
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    return app


@pytest.fixture
def fake_server() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    import uvicorn

    received: list[dict[str, Any]] = []
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(fake_openai_app(received), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", received
    server.should_exit = True
    thread.join(timeout=10)


def test_bench_serve_writes_json(fake_server: tuple[str, list[dict[str, Any]]], tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    url, received = fake_server
    out = tmp_path / "bench.json"
    assert main(["bench", "serve", "--base-url", url, "--num-prompts", "12", "--concurrency", "4",
                 "--input-len", "16", "--output-len", "8", "--seed", "3", "--json", str(out)]) == 0
    assert "Output token throughput" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["model"] == "fake-model"  # found through /v1/models
    assert (result["completed"], result["failed"], result["total_output_tokens"]) == (12, 0, 96)
    assert result["total_input_tokens"] == 12 * 7  # the server's usage, not the nominal length
    for name in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "std", "p50", "p90", "p99"):
            assert result[f"{stat}_{name}_ms"] is not None
        assert 0 < result[f"p50_{name}_ms"] <= result[f"p99_{name}_ms"] < 5000
    assert result["mean_ttft_ms"] >= 10 * 0.9 and result["mean_e2el_ms"] > result["mean_ttft_ms"]
    assert 0 < result["request_throughput"] and result["output_throughput"] == pytest.approx(
        96 / result["duration_s"])
    assert len(received) == 12
    for body in received:
        assert body["stream"] and body["ignore_eos"] is True and body["max_tokens"] == 8
        assert body["stream_options"] == {"include_usage": True}
        assert len(body["messages"][0]["content"].split()) == 16


def test_bench_serve_completions_jsonl_and_failures(fake_server: tuple[str, list[dict[str, Any]]],
                                                   tmp_path: Path) -> None:
    from qwenstack.bench.serve import BenchSpec, compute_metrics, jsonl_requests, run_benchmark

    url, received = fake_server
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "one two"}\n\n{"prompt": "three", "output_len": 3}\n')
    requests = jsonl_requests(data, 5, output_len=4)
    assert [r.output_len for r in requests] == [4, 3, 4, 3, 4]
    spec = BenchSpec(url + "/v1/", "fake-model", 2, endpoint="completions")
    results, duration = asyncio.run(run_benchmark(spec, requests))
    assert [r.output_tokens for r in results] == [4, 3, 4, 3, 4] and all(r.ok for r in results)
    # Two clients in flight: the server may receive each pair in either order, so compare what was sent.
    sent = sorted((b["prompt"], b["max_tokens"]) for b in received)
    assert sent == sorted([("one two", 4), ("three", 3), ("one two", 4), ("three", 3), ("one two", 4)])
    bad, _ = asyncio.run(run_benchmark(BenchSpec(url, "missing", 1), requests[:1]))
    assert not bad[0].ok and "HTTP 404" in bad[0].error and "no such model" in bad[0].error
    metrics = compute_metrics(bad, 1.0, requests[:1])
    assert metrics["failed"] == 1 and metrics["completed"] == 0 and metrics["mean_ttft_ms"] is None


def test_bench_random_workload_is_seeded() -> None:
    from qwenstack.bench.serve import percentile, random_requests

    a, b = random_requests(3, 50, 10, seed=1), random_requests(3, 50, 10, seed=1)
    assert a == b and a != random_requests(3, 50, 10, seed=2)
    assert all(len(r.prompt.split()) == 50 for r in a) and len({r.prompt for r in a}) == 3
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([5], 99) == 5 and percentile([], 50) is None


def test_serve_says_where_it_listens_and_stops_cleanly_on_ctrl_c_while_loading(tiny_qwen3: Path) -> None:
    """`qwenstack serve` printed no address and no ready line (both were INFO logs under a WARNING root), and a
    Ctrl-C while the model loaded aborted the process (exit 134: the loader thread was inside torch while the
    interpreter finalised). SIGINT is sent at the first 503 of /health, while the model loads."""
    import signal

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "qwenstack.cli", "serve", str(tiny_qwen3), "--port", str(port),
                             "--no-ui"], stderr=subprocess.PIPE, text=True)
    loading = False
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code
            except httpx.HTTPError:
                time.sleep(0.02)
                continue
            loading = status == 503
            if loading or status == 200:
                break
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert f"serving the OpenAI-compatible API at http://127.0.0.1:{port}/v1" in stderr
    assert proc.returncode == 130, stderr  # Ctrl-C's status, never an abort (-6, 134)
    if not (loading and "stopped while loading" in stderr):  # the model was ready first: after its ready line
        assert re.search(r"model '[^']+' ready", stderr), stderr
