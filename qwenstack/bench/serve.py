"""Load test of an OpenAI-compatible server: N streaming requests from C concurrent clients.

    requests = random_requests(100, input_len=512, output_len=128, seed=0)
    results, duration = asyncio.run(run_benchmark(BenchSpec("http://127.0.0.1:8000", "Qwen/Qwen3-0.6B", 8), requests))
    metrics = compute_metrics(results, duration)

Definitions follow vLLM's `bench serve`, so the numbers compare:
- TTFT: request sent -> first chunk carrying generated text (content, reasoning or a tool call).
- TPOT: per request, (latency - TTFT) / (output tokens - 1); requests with one output token have none.
- ITL: time between successive text-carrying chunks (a chunk that carries several tokens is one gap).
- E2EL: request sent -> end of the stream.
- Output tokens: the server's `usage.completion_tokens` (requested with stream_options.include_usage),
  else the number of text-carrying chunks. Input tokens: `usage.prompt_tokens`, else the nominal length.
Every request asks for exactly `output_len` tokens: `max_tokens` plus vLLM's `ignore_eos: true`.
The random workload is words drawn from a fixed list (about one token each in Qwen's tokenizer),
seeded, so two runs with the same seed send the same prompts.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from qwenstack.errors import QwenstackError

# Common English words; each is about one token with its leading space in Qwen's BPE.
WORDS = tuple(dict.fromkeys("""
the of and to in is was for on that with as by at from his her they have this which one had not but are
were all their when there been has more would who will time year people some could them other than then
now only its over also new into after first two may about any like these world over state city water
house light river music story night green paper stone field garden window school market summer winter
morning evening number system market letter mother father friend family child table island country
mountain forest animal bird horse apple bread sugar coffee river ocean planet circle square simple
quick brown happy early later small large great little short long young old right left high low open
close begin bring build carry change choose come follow give grow hold keep learn leave listen live
make move need play read remember run say see send show sing sit speak stand start stay take talk tell
think travel turn understand walk want watch work write answer question reason result problem method
""".split()))


@dataclass(frozen=True)
class BenchRequest:
    prompt: str | None  # for /v1/completions, or wrapped as one user message for chat
    messages: list[dict[str, Any]] | None  # for /v1/chat/completions
    input_len: int  # nominal prompt length in tokens (words for the random workload)
    output_len: int


@dataclass(frozen=True)
class BenchSpec:
    base_url: str  # http://host:port or http://host:port/v1
    model: str
    concurrency: int
    endpoint: str = "chat"  # "chat" or "completions"
    api_key: str | None = None
    temperature: float | None = None  # None: the server's default
    ignore_eos: bool = True
    timeout_s: float = 600.0

    @property
    def api_root(self) -> str:
        root = self.base_url.rstrip("/")
        return root if root.endswith("/v1") else root + "/v1"


@dataclass
class RequestResult:
    ok: bool
    start: float  # time.perf_counter() when sent
    latency: float = 0.0  # seconds, to the end of the stream
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None  # as the server counted them
    error: str | None = None


def random_requests(num: int, input_len: int, output_len: int, seed: int) -> list[BenchRequest]:
    rng = random.Random(seed)
    return [BenchRequest(" ".join(rng.choice(WORDS) for _ in range(input_len)), None, input_len, output_len)
            for _ in range(num)]


def jsonl_requests(path: Path, num: int, output_len: int) -> list[BenchRequest]:
    """One {"prompt": ...} or {"messages": [...]} per line (optional "output_len"); cycled to `num` requests."""
    base: list[BenchRequest] = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno} is not JSON: {exc}") from None
        out_len = int(row.get("output_len", output_len)) if isinstance(row, dict) else output_len
        if isinstance(row, dict) and isinstance(row.get("prompt"), str):
            base.append(BenchRequest(row["prompt"], None, len(row["prompt"].split()), out_len))
        elif isinstance(row, dict) and isinstance(row.get("messages"), list):
            words = sum(len(str(m.get("content", "")).split()) for m in row["messages"] if isinstance(m, dict))
            base.append(BenchRequest(None, row["messages"], words, out_len))
        else:
            raise ValueError(f"{path}:{lineno} needs a \"prompt\" string or a \"messages\" list")
    if not base:
        raise ValueError(f"{path} holds no requests")
    return list(itertools.islice(itertools.cycle(base), num))


def _payload(spec: BenchSpec, request: BenchRequest) -> tuple[str, dict[str, Any]]:
    body: dict[str, Any] = {"model": spec.model, "max_tokens": request.output_len, "stream": True,
                            "stream_options": {"include_usage": True}}
    if spec.ignore_eos:
        body["ignore_eos"] = True
    if spec.temperature is not None:
        body["temperature"] = spec.temperature
    if spec.endpoint == "chat":
        body["messages"] = request.messages or [{"role": "user", "content": request.prompt}]
        return spec.api_root + "/chat/completions", body
    if request.prompt is None:
        raise ValueError("the completions endpoint needs prompts, not messages (use --endpoint chat)")
    body["prompt"] = request.prompt
    return spec.api_root + "/completions", body


def _chunk_has_output(choice: dict[str, Any]) -> bool:
    if choice.get("text"):
        return True
    delta = choice.get("delta") or {}
    return bool(delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning")
                or delta.get("tool_calls"))


async def send_request(client: Any, spec: BenchSpec, request: BenchRequest) -> RequestResult:
    """One streaming request; failures are recorded in the result, never raised."""
    url, body = _payload(spec, request)
    headers = {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
    result = RequestResult(ok=False, start=time.perf_counter())
    chunks, last = 0, result.start
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode("utf-8", "replace")
                result.error = f"HTTP {response.status_code}: {text[:300]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    result.error = f"error frame: {json.dumps(chunk['error'])[:300]}"
                    return result
                usage = chunk.get("usage")
                if usage:
                    result.output_tokens = int(usage.get("completion_tokens") or 0)
                    result.prompt_tokens = usage.get("prompt_tokens")
                if any(_chunk_has_output(c) for c in chunk.get("choices") or []):
                    now = time.perf_counter()
                    if result.ttft is None:
                        result.ttft = now - result.start
                    else:
                        result.itl.append(now - last)
                    last = now
                    chunks += 1
    except Exception as exc:  # noqa: BLE001 - a refused or broken connection is a failed request
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.latency = time.perf_counter() - result.start
    result.output_tokens = result.output_tokens or chunks
    # Tokens that decode to no text (special tokens, an incomplete byte sequence) are still generated work:
    # a stream whose usage counts them succeeded, it just has no time to first text.
    result.ok = result.ttft is not None or result.output_tokens > 0
    if not result.ok:
        result.error = "the stream ended without any generated text"
    return result


async def run_benchmark(spec: BenchSpec, requests: Sequence[BenchRequest]) -> tuple[list[RequestResult], float]:
    """Sends every request with at most `spec.concurrency` in flight; returns results in request order and
    the wall time in seconds from the first send to the last completion."""
    import httpx

    if spec.concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    results: list[RequestResult | None] = [None] * len(requests)
    pending = iter(range(len(requests)))
    limits = httpx.Limits(max_connections=spec.concurrency, max_keepalive_connections=spec.concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(spec.timeout_s), limits=limits) as client:
        async def worker() -> None:
            for i in pending:  # a shared iterator: each index is taken by exactly one worker
                results[i] = await send_request(client, spec, requests[i])

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(spec.concurrency, len(requests)))))
        duration = time.perf_counter() - start
    return [r for r in results if r is not None], duration


async def first_model(base_url: str, api_key: str | None = None) -> str:
    """The first model the server lists at /v1/models (for when --model is not given)."""
    import httpx

    spec = BenchSpec(base_url, "", 1, api_key=api_key)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            response = await client.get(spec.api_root + "/models", headers=headers)
            response.raise_for_status()
            data = response.json().get("data") or []
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code == 401:
            raise QwenstackError(f"the server at {spec.api_root} refused the API key: pass --api-key or set "
                                 f"QWENSTACK_API_KEY") from None
        raise QwenstackError(f"could not list the models at {spec.api_root}/models ({exc}); pass --model") from None
    except (httpx.HTTPError, ValueError) as exc:
        raise QwenstackError(f"could not list the models at {spec.api_root}/models ({exc}); "
                             f"is the server running? (or pass --model)") from None
    if not data:
        raise ValueError(f"{spec.api_root}/models lists no models")
    return str(data[0]["id"])


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    ordered = sorted(values)
    if not ordered:
        return None
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


PERCENTILES = (50, 90, 99)
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")


def compute_metrics(results: Sequence[RequestResult], duration: float,
                    requests: Sequence[BenchRequest] | None = None) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    nominal = [q.input_len for q in requests] if requests is not None else [0] * len(results)
    total_input = sum(r.prompt_tokens if r.prompt_tokens is not None else n
                      for r, n in zip(results, nominal) if r.ok)
    total_output = sum(r.output_tokens for r in ok)
    samples = {
        "ttft": [r.ttft for r in ok if r.ttft is not None],
        "tpot": [(r.latency - r.ttft) / (r.output_tokens - 1)
                 for r in ok if r.ttft is not None and r.output_tokens > 1],
        "itl": [gap for r in ok for gap in r.itl],
        "e2el": [r.latency for r in ok],
    }
    duration = max(duration, 1e-9)
    metrics: dict[str, Any] = {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration,
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(ok) / duration,
        "output_throughput": total_output / duration,
        "total_token_throughput": (total_input + total_output) / duration,
    }
    for name in LATENCY_METRICS:  # None where there is nothing to measure (e.g. TPOT of 1-token replies)
        values = [v * 1000 for v in samples[name]]
        mean = sum(values) / len(values) if values else None
        metrics[f"mean_{name}_ms"] = mean
        metrics[f"std_{name}_ms"] = (math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
                                     if mean is not None else None)
        for q in PERCENTILES:
            metrics[f"p{q}_{name}_ms"] = percentile(values, q)
    return metrics


def format_table(metrics: dict[str, Any]) -> str:
    lines = [
        "=" * 20 + " Serving Benchmark Result " + "=" * 20,
        f"{'Successful requests:':<40}{metrics['completed']:>12}",
        f"{'Failed requests:':<40}{metrics['failed']:>12}",
        f"{'Benchmark duration (s):':<40}{metrics['duration_s']:>12.2f}",
        f"{'Total input tokens:':<40}{metrics['total_input_tokens']:>12}",
        f"{'Total generated tokens:':<40}{metrics['total_output_tokens']:>12}",
        f"{'Request throughput (req/s):':<40}{metrics['request_throughput']:>12.2f}",
        f"{'Output token throughput (tok/s):':<40}{metrics['output_throughput']:>12.2f}",
        f"{'Total token throughput (tok/s):':<40}{metrics['total_token_throughput']:>12.2f}",
        "",
        f"{'latency (ms)':<14}" + "".join(f"{h:>10}" for h in ["mean"] + [f"p{q}" for q in PERCENTILES]),
    ]
    labels = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2E latency"}
    for name in LATENCY_METRICS:
        cells = [metrics[f"mean_{name}_ms"]] + [metrics[f"p{q}_{name}_ms"] for q in PERCENTILES]
        lines.append(f"{labels[name]:<14}" + "".join(f"{c:>10.2f}" if c is not None else f"{'-':>10}" for c in cells))
    lines.append("=" * 66)
    return "\n".join(lines)
