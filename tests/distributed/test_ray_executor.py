"""Tensor parallelism under a local Ray cluster started by the test, and a worker killed mid-request.

The Ray run must give the one-rank tokens (the same TP=2 path as test_tensor_parallel.py, with the worker
placed by a placement group as a Ray actor). Killing a worker while requests run must end them with 503
(EngineUnavailableError through the API) within a bound, and the server must keep answering."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import openai
import pytest
import ray
from parallel_utils import greedy_run, make_engine, shared_prefix_prompts
from server_utils import BackgroundServer

from qwenstack.distributed.config import ParallelConfig
from qwenstack.engine.engine import EngineConfig
from qwenstack.serving.app import create_app
from qwenstack.serving.config import ServerConfig
from qwenstack.serving.served import build_served_model


@pytest.fixture(scope="module")
def local_ray() -> object:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_tp2_under_ray_matches_one_rank(tiny_qwen3: Path, local_ray: object) -> None:
    prompts = shared_prefix_prompts(4)
    one = greedy_run(tiny_qwen3, ParallelConfig(), prompts, max_tokens=8)
    two = greedy_run(tiny_qwen3, ParallelConfig(tensor_parallel_size=2, distributed_executor_backend="ray"), prompts,
                     max_tokens=8)
    assert two.tokens == one.tokens


def kill_mid_request(tiny_qwen3: Path, parallel: ParallelConfig) -> None:
    engine = make_engine(tiny_qwen3, parallel, EngineConfig(block_size=4, kv_cache_memory=2**20))
    tok = engine.decoder
    served = build_served_model("tiny", None, tok, engine.config, {"model_type": "qwen3"}, tiny_qwen3,
                                replicas=[engine])
    app = create_app([served], ServerConfig(ui_db_path=":memory:"))
    executor = engine.runner.executor  # type: ignore[attr-defined]
    with BackgroundServer(app) as server:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)

        async def scenario() -> list[BaseException | object]:
            async def one(i: int) -> object:
                return await client.completions.create(model="tiny", prompt=f"tell me {i}", max_tokens=400,
                                                       temperature=0, extra_body={"ignore_eos": True})

            tasks = [asyncio.create_task(one(i)) for i in range(3)]
            while engine.counters.generation_tokens < 3:  # the requests are decoding
                await asyncio.sleep(0.05)
            executor.workers.kill(1)
            return await asyncio.gather(*tasks, return_exceptions=True)

        start = time.monotonic()
        results = asyncio.run(scenario())
        assert time.monotonic() - start < 90
        assert all(isinstance(r, openai.APIStatusError) and r.status_code == 503 for r in results), results
        assert "tensor-parallel worker" in str(results[0])
        # The server stays up: the model answers 503 at once, other routes answer.
        sync = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=30)
        with pytest.raises(openai.APIStatusError) as err:
            sync.completions.create(model="tiny", prompt="again", max_tokens=2)
        assert err.value.status_code == 503
        assert [m.id for m in sync.models.list().data] == ["tiny"]
    served.engine.shutdown()


@pytest.mark.slow
def test_killed_worker_gives_503_not_a_hang(tiny_qwen3: Path) -> None:
    kill_mid_request(tiny_qwen3, ParallelConfig(tensor_parallel_size=2))


@pytest.mark.slow
def test_killed_ray_worker_gives_503_not_a_hang(tiny_qwen3: Path, local_ray: object) -> None:
    kill_mid_request(tiny_qwen3, ParallelConfig(tensor_parallel_size=2, distributed_executor_backend="ray"))
