"""The server under load against the offline engine on the same workload, in one run.

    python benchmarks/make_checkpoint.py qwen3-0.6b /tmp/bench/qwen3-0.6b --tokenizer-from qwenstack/assets/demo-model
    python benchmarks/bench_server.py /tmp/bench/qwen3-0.6b

Starts `qwenstack serve` on loopback, runs `qwenstack bench serve`'s measurement (N streaming completions
from C concurrent clients, fixed output length) and then the offline engine (LLM.generate) on the very
same prompts and output lengths. Reports both output token rates, their ratio, and the latency
percentiles from the load test.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save, threads  # noqa: E402

from qwenstack.bench.serve import BenchSpec, compute_metrics, format_table, random_requests, run_benchmark  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the server exited during start-up")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError("the server did not become healthy")


def offline_rate(model_dir: Path, prompts: list[str], output_len: int, max_num_seqs: int) -> float:
    import torch

    from qwenstack.engine.params import SamplingParams
    from qwenstack.llm import LLM

    torch.set_num_threads(threads())
    llm = LLM(str(model_dir), dtype="bfloat16", max_num_seqs=max_num_seqs)
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description="server vs offline engine")
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="the server's step token budget (default: qwenstack serve's own)")
    parser.add_argument("--name", default="server-qwen3-0.6b", help="output file stem under benchmarks/out")
    args = parser.parse_args()
    requests = random_requests(args.num_prompts, args.input_len, args.output_len, seed=0)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads()))
    command = [sys.executable, "-m", "qwenstack", "serve", str(args.model_dir), "--port", str(port),
               "--dtype", "bfloat16", "--max-num-seqs", str(args.concurrency), "--no-ui"]
    if args.max_num_batched_tokens is not None:
        command += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    proc = subprocess.Popen(command, env=env)
    try:
        wait_healthy(base, proc)
        # Greedy, as the offline run below: the same workload on both sides (the server default samples).
        spec = BenchSpec(base, str(args.model_dir.resolve().name), args.concurrency, endpoint="completions",
                         temperature=0.0)
        results, duration = asyncio.run(run_benchmark(spec, requests))
        metrics = compute_metrics(results, duration)
        print(format_table(metrics), flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    offline = offline_rate(args.model_dir, [r.prompt or "" for r in requests], args.output_len, args.concurrency)
    served = metrics["output_throughput"]
    out = {"workload": vars(args) | {"model_dir": str(args.model_dir)}, "server": metrics,
           "offline_output_tok_s": offline, "server_output_tok_s": served, "server_over_offline": served / offline}
    print(f"server {served:.1f} tok/s, offline {offline:.1f} tok/s, ratio {served / offline:.2f}")
    print(save(args.name, out))


if __name__ == "__main__":
    main()
