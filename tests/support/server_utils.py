"""Running a real qwenstack app under uvicorn on a free loopback port, in a background thread."""
from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch
import uvicorn

from qwenstack.engine.engine import EngineConfig
from qwenstack.models.registry import load_model
from qwenstack.serving.served import ServedModel, build_served_model
from qwenstack.tokenizer import Tokenizer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BackgroundServer:
    def __init__(self, app: Any, port: int | None = None) -> None:
        self.port = port or free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, name="test-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


def tiny_served_model(path: Path, name: str = "tiny", **engine_options: Any) -> ServedModel:
    model = load_model(path, dtype=torch.float32)
    tok = Tokenizer.from_dir(path)
    config = EngineConfig(**{"block_size": 4, "kv_cache_memory": 2**22, **engine_options})
    return build_served_model(name, model, tok, config, hf_config={"model_type": "qwen3"}, model_dir=path)


def before_each_step(monkeypatch: Any, engine: Any, wait: Callable[[], object]) -> None:
    """Runs `wait()` in the engine's thread before each of its steps, for the rest of the test: an Event's
    wait holds the engine until the test lets it go, a sleep paces it, so a request cannot finish before the
    test has done what it must do mid-request."""
    real_step = engine.step
    monkeypatch.setattr(engine, "step", lambda: (wait(), real_step())[1])


def fail_after_first_output(monkeypatch: Any, engine: Any, message: str = "the engine broke") -> None:
    """For the rest of the test, each request's engine stream hands over its first output and then fails with
    RuntimeError(message): a failure after a stream's 200."""
    generate = engine.generate

    async def failing(*args: Any, **kwargs: Any) -> Any:
        stream = generate(*args, **kwargs)
        yield await stream.__anext__()
        await stream.aclose()
        raise RuntimeError(message)

    monkeypatch.setattr(engine, "generate", failing)


def wait_idle(engine: Any, timeout: float = 20.0) -> bool:
    """Whether the engine gets back to no requests and every KV block free within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if engine.block_manager.num_free_blocks == engine.block_manager.num_blocks \
                and not engine.has_unfinished_requests():
            return True
        time.sleep(0.05)
    return False
