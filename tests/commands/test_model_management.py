"""Ollama-style model management against a local fake Hugging Face Hub (tests/fake_hub.py; never the real hub):
`qwenstack pull` shows the size and destination first, downloads into the cache and resumes a partial file;
`qwenstack models` lists it with its size and quantization; `qwenstack rm` deletes it; `qwenstack ps` asks a
running server what it has loaded."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from fake_hub import FakeHub
from server_utils import BackgroundServer, tiny_served_model
from qwenstack.cli import main
from qwenstack.errors import QwenstackError
from qwenstack.serving.app import create_app
from qwenstack.serving.config import ServerConfig

REPO = "Qwen/Qwen3-Tiny-AWQ"
CONFIG = {"model_type": "qwen3", "torch_dtype": "float16",
          "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128}}
WEIGHTS = bytes(range(256)) * 800  # 200 KiB


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    import huggingface_hub.constants as constants

    files = {"config.json": json.dumps(CONFIG).encode(), "model.safetensors": WEIGHTS,
             "tokenizer.json": b"{}", "pytorch_model.bin": b"never fetched"}
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    with FakeHub({REPO: files}) as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        yield fake


def test_pull_models_rm(hub: FakeHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pull", REPO]) == 0
    out = capsys.readouterr().out
    snapshot = tmp_path / "cache" / "models--Qwen--Qwen3-Tiny-AWQ" / "snapshots"
    total = len(WEIGHTS) + len(json.dumps(CONFIG)) + 2
    assert f"pulling {REPO}: 3 files, {total / 1024:.1f} KiB" in out and f"into {snapshot}" in out
    path = next(snapshot.iterdir())
    assert (path / "model.safetensors").read_bytes() == WEIGHTS and not (path / "pytorch_model.bin").exists()
    assert out.index("into") < out.index("done")  # the size and destination come first

    assert main(["pull", REPO]) == 0
    assert "already up to date" in capsys.readouterr().out

    assert main(["models", "--json"]) == 0
    found = {m["name"]: m for m in json.loads(capsys.readouterr().out)["models"]}
    assert found[REPO]["quantization"] == "awq 4-bit" and found[REPO]["size_bytes"] >= len(WEIGHTS)
    assert main(["models"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(REPO))
    assert "awq 4-bit" in row and "KiB" in row

    assert main(["rm", REPO]) == 0
    assert f"deleted {REPO}" in capsys.readouterr().out
    assert not (tmp_path / "cache" / "models--Qwen--Qwen3-Tiny-AWQ").exists()
    assert main(["rm", REPO]) == 1 and "not in the cache" in capsys.readouterr().err
    assert main(["rm", "qwenstack-demo"]) == 1


def test_pull_resumes_a_partial_download(hub: FakeHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blobs = tmp_path / "cache" / "models--Qwen--Qwen3-Tiny-AWQ" / "blobs"
    blobs.mkdir(parents=True)
    half = len(WEIGHTS) // 2
    (blobs / (FakeHub._blob_id(WEIGHTS) + ".partial")).write_bytes(WEIGHTS[:half])  # an interrupted pull
    assert main(["pull", REPO]) == 0
    assert any(path.endswith("model.safetensors") and rng == f"bytes={half}-" for method, path, rng in hub.requests
               if method == "GET")
    snapshot = next((tmp_path / "cache" / "models--Qwen--Qwen3-Tiny-AWQ" / "snapshots").iterdir())
    assert (snapshot / "model.safetensors").read_bytes() == WEIGHTS


def test_pull_refuses_offline_and_unknown(hub: FakeHub, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pull", "Qwen/missing"]) == 1 and "cannot list 'Qwen/missing'" in capsys.readouterr().err
    monkeypatch.setenv("QWENSTACK_OFFLINE", "1")
    assert main(["pull", REPO]) == 1 and "offline" in capsys.readouterr().err


def test_ps_reports_loaded_models(tiny_qwen3: Path, capsys: pytest.CaptureFixture[str]) -> None:
    app = create_app([tiny_served_model(tiny_qwen3)], ServerConfig(enable_ui=False, api_key="k"))
    with BackgroundServer(app) as srv:
        assert main(["ps", "--base-url", srv.url + "/v1", "--api-key", "k", "--json"]) == 0
        status = json.loads(capsys.readouterr().out)
        (model,) = status["models"]
        assert model["name"] == "tiny" and model["device"] == "cpu" and model["dtype"] == "float32"
        assert model["weights_bytes"] > 0 and model["kv_cache_bytes"] > 0 and model["kv_usage"] == 0
        assert model["running"] == model["waiting"] == 0 and model["max_model_len"] == 512
        assert main(["ps", "--base-url", srv.url, "--api-key", "k"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].split()[:3] == ["NAME", "DEVICE", "WEIGHTS"] and lines[1].startswith("tiny  cpu (float32)")
        assert main(["ps", "--base-url", srv.url]) == 1  # no key: the server says 401, and ps says so
        assert "refused the API key: pass --api-key" in capsys.readouterr().err
        from qwenstack.bench.serve import first_model  # bench serve's first request says the same

        with pytest.raises(QwenstackError, match="refused the API key"):
            asyncio.run(first_model(srv.url))
    assert main(["ps", "--base-url", srv.url]) == 1 and "no answer" in capsys.readouterr().err



def test_pull_shows_a_progress_bar(hub: FakeHub, capsys: pytest.CaptureFixture[str]) -> None:
    # qwenstack's own bar (tqdm on stderr, in bytes, named by the repo), shown whatever
    # HF_HUB_DISABLE_PROGRESS_BARS says (the fixture sets it for huggingface_hub's bars).
    assert main(["pull", REPO]) == 0
    captured = capsys.readouterr()
    frames = [f for f in captured.err.replace("\n", "\r").split("\r") if f.startswith(f"{REPO}:")]
    assert frames, captured.err
    assert frames[0].startswith(f"{REPO}:   0%") and "/200k" in frames[0]  # the missing bytes, shown from the start
    assert frames[-1].startswith(f"{REPO}: 100%") and "200k/200k" in frames[-1] and "B/s" in frames[-1]
    assert "%|" not in captured.out  # the bar is not mixed into stdout
