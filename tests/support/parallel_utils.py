"""Running the same prompts through one rank and through tensor/expert-parallel ranks (tests/distributed/test_tensor_parallel.py,
tests/distributed/test_ray_executor.py, benchmarks/bench_parallel.py)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qwenstack.distributed.config import ParallelConfig
from qwenstack.distributed.executor import start_parallel
from qwenstack.distributed.worker import ModelSource
from qwenstack.engine.engine import EngineConfig, LLMEngine
from qwenstack.engine.params import SamplingParams
from qwenstack.loading import load


@dataclass
class RunResult:
    tokens: list[list[int]]
    preemptions: int
    prefix_hits: int
    kv_bytes_per_rank: int
    comm_seconds: float = 0.0


def shared_prefix_prompts(n: int = 6, prefix_len: int = 40, vocab: int = 200) -> list[list[int]]:
    """Prompts that share a long prefix (prefix-cache hits) and end differently (a real batch)."""
    prefix = [(7 * i + 3) % vocab + 5 for i in range(prefix_len)]
    return [prefix + [(11 * j + 5 * k) % vocab + 5 for k in range(3 + j)] for j in range(n)]


def make_engine(path: Path, parallel: ParallelConfig, config: EngineConfig, quantization: str | None = None,
                dtype: str = "float32") -> LLMEngine:
    source = ModelSource(str(path), dtype=dtype, quantization=quantization)
    if parallel.tensor_parallel_size == 1:
        loaded = load(source.model, dtype=dtype, device="cpu", quantization=quantization)
        return LLMEngine(loaded.model, loaded.tokenizer, loaded.tokenizer.eos_token_ids, config)
    loaded, executor = start_parallel(source, parallel)
    return LLMEngine(loaded.model, loaded.tokenizer, loaded.tokenizer.eos_token_ids, config,
                     runner_factory=executor.make_runner)


def greedy_run(path: Path, parallel: ParallelConfig, prompts: list[list[int]], max_tokens: int = 12,
               kv_cache_memory: int = 1 << 20, quantization: str | None = None, max_num_seqs: int = 64,
               block_size: int = 16, multimodal: list | None = None, kv_cache_dtype: str = "auto") -> RunResult:
    """Greedy tokens, ignoring EOS so every prompt decodes max_tokens. Prompts go in two waves: the second
    wave finds the first's prefix in the cache."""
    config = EngineConfig(kv_cache_memory=kv_cache_memory, max_num_seqs=max_num_seqs, block_size=block_size,
                          max_num_batched_tokens=256, kv_cache_dtype=kv_cache_dtype)
    engine = make_engine(path, parallel, config, quantization)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        half = max(1, len(prompts) // 3)
        mm = multimodal or [None] * len(prompts)
        first = engine.generate_all(prompts[:half], [params] * half, mm[:half])
        rest = engine.generate_all(prompts[half:], [params] * (len(prompts) - half), mm[half:])
        group = getattr(getattr(engine.runner, "executor", None), "group", None)
        return RunResult([o.outputs[0].token_ids for o in first + rest], engine.counters.preemptions,
                         engine.block_manager.stats.hits, engine.runner.kv_cache_bytes(),
                         group.stats.seconds if group is not None else 0.0)
    finally:
        engine.close()
