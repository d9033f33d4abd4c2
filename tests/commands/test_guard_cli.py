"""`qwenstack guard` (text and JSONL, Gen and Stream guards, table and JSON output) and the `serve` guard
flags, in-process through qwenstack.cli.main."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from guard_checkpoints import UNSAFE_ANSWER, build_flagging_stream, build_gen_guard
from qwenstack.cli import main

SMALL = ["--device", "cpu", "--dtype", "float32", "--kv-cache-memory", "4MiB"]


@pytest.fixture(scope="module")
def gen_guard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_gen_guard(tmp_path_factory.mktemp("gen"), UNSAFE_ANSWER).path


def test_guard_text_table(gen_guard: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["guard", "-m", str(gen_guard), "How do I pick a lock?", "Hello", *SMALL]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["#", "direction", "safety", "action", "categories", "refusal", "text"]
    assert lines[1].split()[:4] == ["1", "prompt", "Unsafe", "block"]
    assert "Violent, Non-violent Illegal Acts" in lines[1] and "How do I pick a lock?" in lines[1]
    assert out.strip().splitlines()[-1].startswith("2 item(s): 2 Unsafe; 2 block (judged in ")


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_guard_answer_and_policy(gen_guard: Path, capsys: pytest.CaptureFixture[str], kv_cache_dtype: str,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from qwenstack.guard import gen

    configs = []
    real_config = gen.EngineConfig
    monkeypatch.setattr(gen, "EngineConfig", lambda **kw: configs.append(real_config(**kw)) or configs[-1])
    argv = ["guard", "-m", str(gen_guard), "Hi", "--answer", "Here is how.", "--policy", "answer.unsafe=flag", "--json"]
    assert main([*argv, *SMALL, "--kv-cache-dtype", kv_cache_dtype]) == 0
    assert [c.kv_cache_dtype for c in configs] == [kv_cache_dtype]  # the guard's own engine
    [row] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (row["direction"], row["safety"], row["action"], row["refusal"]) == ("answer", "Unsafe", "flag", "No")
    assert row["raw"] == UNSAFE_ANSWER and row["messages"][-1] == {"role": "assistant", "content": "Here is how."}


def test_guard_jsonl_file(gen_guard: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    items = tmp_path / "items.jsonl"
    items.write_text("\n".join([
        json.dumps("a plain prompt"),
        json.dumps({"prompt": "q", "response": "a"}),
        "",
        json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}),
        json.dumps({"text": "t"}),
    ]) + "\n")
    assert main(["guard", "-m", str(gen_guard), "--file", str(items), "--json", *SMALL]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["direction"] for r in rows] == ["prompt", "answer", "prompt", "prompt"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"nothing": 1}\n')
    assert main(["guard", "-m", str(gen_guard), "--file", str(bad), *SMALL]) == 1
    assert "bad.jsonl:2" in capsys.readouterr().err
    assert main(["guard", "-m", str(gen_guard), *SMALL]) == 1
    assert "nothing to moderate" in capsys.readouterr().err


def test_guard_with_a_stream_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from checkpoints import tiny_tokenizer

    flagged = tiny_tokenizer().encode("☠").ids
    path = build_flagging_stream(tmp_path / "stream", flagged)
    argv = ["guard", "-m", str(path), "a calm question", "a ☠ question", "--json", "--device", "cpu",
            "--dtype", "float32"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["safety"], r["action"]) for r in rows] == [("Safe", "allow"), ("Unsafe", "block")]
    assert main(["guard", "-m", str(path), "fine", "--answer", "then ☠", "--json", "--device", "cpu"]) == 0
    [row] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (row["direction"], row["safety"], row["categories"]) == ("answer", "Unsafe", ["Violent"])


def test_serve_guard_flags() -> None:
    from qwenstack.cli import build_parser, discover_commands
    from qwenstack.commands.serve import serve_config_from_args, server_config

    parser = build_parser(discover_commands()[0])
    args = parser.parse_args(["serve", "m", "--guard", "g", "--guard-stream", "s", "--guard-policy",
                              "controversial=block", "--guard-fail-open", "--guard-stream-window", "4"])
    config = server_config(serve_config_from_args(args))
    assert (config.guard_model, config.guard_stream_model, config.guard_policy) == ("g", "s", "controversial=block")
    assert config.guard_fail_open is True and config.guard_stream_window == 4
    plain = server_config(serve_config_from_args(parser.parse_args(["serve", "m"])))
    assert (plain.guard_model, plain.guard_fail_open, plain.guard_stream_window) == (None, False, 0)
    for argv, message in ((["--guard-policy", "unsafe=flag"], "need --guard"),
                          (["--guard", "g", "--guard-policy", "unsafe=maybe"], "guard policy item"),
                          (["--guard", "g", "--guard-stream-window", "-1"], ">= 0")):
        with pytest.raises(ValueError, match=message):
            serve_config_from_args(parser.parse_args(["serve", "m", *argv]))


def test_guard_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["guard", "--help"])
    out = capsys.readouterr().out
    assert "--file" in out and "--policy" in out and "Qwen3Guard-Stream" in out
