"""Data-parallel replicas behind one API: the prefix-aware router (unit), then two replicas of a tiny Qwen3
in a real server, driven with the openai SDK: requests sharing a long prefix land on one replica, which the
per-replica metrics show, and the summed metrics still describe one model."""
from __future__ import annotations

import re
from pathlib import Path

import httpx
import openai
import pytest
import torch
from server_utils import BackgroundServer

from qwenstack.engine.engine import EngineConfig, LLMEngine
from qwenstack.models.registry import load_model
from qwenstack.serving.app import create_app
from qwenstack.serving.config import ServerConfig
from qwenstack.serving.replicas import PrefixRouter, ReplicatedEngine, prompt_block_hashes
from qwenstack.serving.served import build_served_model
from qwenstack.tokenizer import Tokenizer


def test_router_follows_the_longest_cached_prefix() -> None:
    router = PrefixRouter(num_replicas=2, block_size=4)
    shared = list(range(100, 116))  # 4 full blocks
    first = router.choose(shared + [1, 2])
    other = router.choose([7] * 16)  # nothing in common: the least loaded replica, the other one
    assert other != first
    assert router.choose(shared + [3, 4, 5]) == first  # the shared prefix wins over load
    assert router.replicas[first].prefix_routed == 1


def test_router_falls_back_to_the_least_loaded_replica() -> None:
    router = PrefixRouter(num_replicas=3, block_size=4)
    picks = [router.choose([i] * 3) for i in range(3)]  # shorter than a block: no prefix to follow
    assert sorted(picks) == [0, 1, 2]
    router.finished(picks[1])
    assert router.choose([9, 9]) == picks[1]  # the only replica with nothing in flight
    for p in picks:
        router.finished(p)
    assert router.choose([8]) in (picks[0], picks[2])  # nothing in flight anywhere: the one sent fewest


def test_block_hashes_are_chained() -> None:
    a = prompt_block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4)
    b = prompt_block_hashes([0, 2, 3, 4, 5, 6, 7, 8], 4)
    assert len(a) == 2 and a[0] != b[0] and a[1] != b[1]  # block 2's hash depends on block 1


def replica_metric(text: str, name: str) -> dict[str, float]:
    pattern = rf'^qwenstack:{name}\{{model_name="tiny",replica="(\d)"\}} ([0-9.e+]+)$'
    return {m.group(1): float(m.group(2)) for m in re.finditer(pattern, text, re.M)}


def test_two_replicas_behind_one_api(tiny_qwen3: Path) -> None:
    config = EngineConfig(block_size=4, kv_cache_memory=2**22)
    tok = Tokenizer.from_dir(tiny_qwen3)
    engines = [LLMEngine(load_model(tiny_qwen3, dtype=torch.float32), tok, tok.eos_token_ids, config)
               for _ in range(2)]
    served = build_served_model("tiny", None, tok, config, {"model_type": "qwen3"}, tiny_qwen3, replicas=engines)
    assert isinstance(served.engine, ReplicatedEngine)
    app = create_app([served], ServerConfig(ui_db_path=":memory:"))
    prefix = "The quick brown fox jumps over the lazy dog while the cat sleeps by the warm fire. " * 3
    with BackgroundServer(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        other = client.completions.create(model="tiny", prompt="Hello there", max_tokens=4, temperature=0)
        assert other.choices[0].text is not None
        for i in range(4):
            out = client.completions.create(model="tiny", prompt=prefix + f"Question {i}:", max_tokens=4,
                                            temperature=0)
            assert out.usage is not None and out.usage.completion_tokens == 4
        metrics = httpx.get(server.url + "/metrics").text
    routed = replica_metric(metrics, "replica_routed_requests")
    prefix_routed = replica_metric(metrics, "replica_prefix_routed_requests")
    hits = replica_metric(metrics, "replica_prefix_cache_hits")
    assert sum(routed.values()) == 5
    # "Hello there" went to one replica; the first long-prefix request to the other (sent fewer), and the next
    # three followed their prefix there.
    home = max(prefix_routed, key=lambda k: prefix_routed[k])
    assert prefix_routed[home] == 3 and routed[home] == 4 and routed[str(1 - int(home))] == 1
    assert hits[home] > 0 and hits[str(1 - int(home))] == 0
    summed = re.search(r'^qwenstack:prefix_cache_hits_total\{model_name="tiny"\} ([0-9.e+]+)$', metrics, re.M)
    assert summed is not None and float(summed.group(1)) == hits[home]
