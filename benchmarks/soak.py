"""Soak: a server under a steady mix of valid, invalid and aborted requests for a fixed time, sampled as it
goes, so growth in memory or latency shows as a difference between the first and the last window.

    python benchmarks/soak.py --duration 1800 --window 300 --rate 4 --out benchmarks/out/soak.json
    python benchmarks/soak.py --duration 120 --window 30          # the 2-minute version (a slow test runs it)

Starts `qwenstack serve` (the bundled demo model unless --model) on 127.0.0.1 as a subprocess and sends
requests at `--rate` per second: chat and completions, streamed and not (valid); malformed bodies, values
out of range, wrong content types, lone surrogates, deep nesting (invalid: each must get a 4xx); streams
the client abandons after a few chunks (aborted). The schedule repeats every `--window` seconds, so the
first and the last window send the same requests. Every `--sample` seconds it records the server's resident
memory (/proc/PID/status VmRSS), KV-cache use and running requests (/metrics), and the latency of the
valid requests finished since the last sample. After `--duration` it stops sending, waits for the answers
in flight, checks that the KV pool is back to idle, prints first-window vs last-window figures and exits
non-zero if any request went unanswered, got a 5xx, or an invalid one was accepted. The peer of the
comparison is the server itself, earlier in the same run (after --warmup seconds of the same traffic).
Stops by itself: at most warmup + duration + 120 s.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

MESSAGES = [{"role": "user", "content": "Tell me something about the sea."}]
INVALID: list[tuple[str, bytes, str]] = [  # (path, body, content type): each must be answered with a 4xx
    ("/v1/chat/completions", b'{"model": "MODEL", "messages": ' + b"[" * 3000 + b"]" * 3000 + b"}", "application/json"),
    ("/v1/chat/completions", b'{"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "seed": 18446744073709551615, "n": 2}', "application/json"),  # noqa: E501
    ("/v1/chat/completions", b'{"model": "MODEL", "messages": [{"role": "user", "content": "a\\ud800b"}]}', "application/json"),
    ("/v1/chat/completions", b'{"model": "MODEL", "messages": [{"role": "system", "content": null}, {"role": "user", "content": "x"}]}', "application/json"),  # noqa: E501
    ("/v1/chat/completions", b'{"model": "MODEL", "messages": [{"role": "user", "content": "hi"}]}', "text/plain"),
    ("/v1/chat/completions", b'{"model": "MODEL", "messages": "hello", "temperature": "hot"}', "application/json"),
    ("/v1/chat/completions", b"{not json", "application/json"),
    ("/v1/completions", b'{"model": "MODEL", "prompt": [5, -1, 99999999999]}', "application/json"),
    ("/v1/completions", b'{"model": "no-such-model", "prompt": "x"}', "application/json"),
    ("/v1/completions", b'{"model": "MODEL", "prompt": "' + b"word " * 20000 + b'"}', "application/json"),
    ("/tokenize", b'{"model": "MODEL", "prompt": "a\\udc00"}', "application/json"),
    ("/api/conversations?offset=9223372036854775808", b"", ""),
]


@dataclass
class Stats:
    started: float
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (finish time, seconds) of valid requests
    counts: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    samples: list[dict[str, float]] = field(default_factory=list)

    def count(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) / 1024  # type: ignore[union-attr]


def gauge(metrics: str, name: str) -> float:
    match = re.search(rf"^qwenstack:{name}\{{[^}}]*\}} ([0-9.e+-]+)$", metrics, re.M)
    return float(match.group(1)) if match else 0.0


async def valid(client: httpx.AsyncClient, model: str, rng: random.Random, stats: Stats) -> None:
    kind = rng.choice(["chat", "chat_stream", "completion", "completion_stream"])
    max_tokens = rng.randint(4, 24)
    if kind.startswith("chat"):
        path, body = "/v1/chat/completions", {"model": model, "messages": MESSAGES, "max_tokens": max_tokens}
    else:
        path, body = "/v1/completions", {"model": model, "prompt": "Once upon a time", "max_tokens": max_tokens}
    body["stream"] = kind.endswith("stream")
    body["seed"] = rng.randrange(2**31)  # the same answer (and length) when the schedule replays this request
    start = time.monotonic()
    if body["stream"]:
        async with client.stream("POST", path, json=body) as r:
            text = "".join([chunk async for chunk in r.aiter_text()])
        ok = r.status_code == 200 and text.rstrip().endswith("data: [DONE]") and '"error"' not in text
    else:
        r = await client.post(path, json=body)
        ok = r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    if not ok:
        stats.problems.append(f"valid {kind}: {r.status_code}")
    stats.latencies.append((time.monotonic(), time.monotonic() - start))
    stats.count("valid")


async def invalid(client: httpx.AsyncClient, model: str, rng: random.Random, stats: Stats) -> None:
    path, raw, content_type = rng.choice(INVALID)
    raw = raw.replace(b"MODEL", model.encode())
    if raw:
        r = await client.post(path, content=raw, headers={"Content-Type": content_type})
    else:
        r = await client.get(path)
    if not 400 <= r.status_code < 500 or set(r.json()) != {"error"}:
        stats.problems.append(f"invalid {path} {raw[:60]!r}: {r.status_code}")
    stats.count("invalid")


async def aborted(client: httpx.AsyncClient, model: str, rng: random.Random, stats: Stats) -> None:
    body = {"model": model, "messages": MESSAGES, "max_tokens": 200, "stream": True, "ignore_eos": True}
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        chunks = 0
        async for _ in r.aiter_lines():
            chunks += 1
            if chunks >= rng.randint(1, 6):
                break  # leaving the block closes the connection mid-stream
    stats.count("aborted")


async def one(client: httpx.AsyncClient, model: str, rng: random.Random, stats: Stats) -> None:
    pick = rng.random()
    kind = valid if pick < 0.6 else invalid if pick < 0.85 else aborted
    try:
        await kind(client, model, rng, stats)
    except Exception as exc:  # an unanswered request: the soak fails
        stats.problems.append(f"{kind.__name__} at {time.monotonic() - stats.started:.1f} s: {exc!r}")


async def sampler(base: str, pid: int, stats: Stats, every: float, stop: asyncio.Event) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        last = time.monotonic()
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=every)
            except asyncio.TimeoutError:
                pass
            now = time.monotonic()
            recent = sorted(s for t, s in stats.latencies if last < t <= now)
            last = now
            metrics = (await client.get("/metrics")).text
            stats.samples.append({
                "t": round(now - stats.started, 1), "rss_mib": round(rss_mib(pid), 1),
                "kv_usage": gauge(metrics, "kv_cache_usage_perc"), "running": gauge(metrics, "num_requests_running"),
                "n": len(recent), "p50_s": _pct(recent, 50), "p95_s": _pct(recent, 95)})
            print(json.dumps(stats.samples[-1]), flush=True)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return round(sorted(values)[min(len(values) - 1, int(len(values) * q / 100))], 4)


def schedule_rng(args: argparse.Namespace, index: int) -> random.Random:
    """The draws of the index-th request sent. The schedule repeats every window (counted from the end of the
    warm-up), so the first and the last window replay the same requests in the same order and at the same
    times: their latencies compare the server with itself on the same work, not two random mixes."""
    period = max(1, round(args.window * args.rate))
    slot = (index - round(args.warmup * args.rate)) % period
    return random.Random(args.seed * 1_000_003 + slot)


async def drive(base: str, model: str, pid: int, args: argparse.Namespace) -> Stats:
    stats = Stats(started=time.monotonic())
    stop = asyncio.Event()
    # Idle connections are dropped by the client after 2 s, before the server's 5 s keep-alive timeout: a
    # request sent on a connection the server is closing at that moment would fail through no fault of either.
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=16, keepalive_expiry=2)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
        sampling = asyncio.ensure_future(sampler(base, pid, stats, args.sample, stop))
        tasks: set[asyncio.Task] = set()
        next_at = time.monotonic()
        end = stats.started + args.warmup + args.duration
        sent = 0
        while time.monotonic() < end:
            task = asyncio.ensure_future(one(client, model, schedule_rng(args, sent), stats))
            sent += 1
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            next_at += 1 / args.rate
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=90)
            for task in pending:
                stats.problems.append("a request was still unanswered 90 s after the end")
                task.cancel()
        stop.set()
        await sampling
        stats.counts["kv_idle_at_end"] = int(await wait_idle(client))
    return stats


async def wait_idle(client: httpx.AsyncClient, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = (await client.get("/metrics")).text
        if gauge(metrics, "kv_cache_usage_perc") == 0 and gauge(metrics, "num_requests_running") == 0 \
                and gauge(metrics, "num_requests_waiting") == 0:
            return True
        await asyncio.sleep(0.5)
    return False


def window(stats: Stats, start: float, end: float) -> dict[str, float]:
    samples = [s for s in stats.samples if start < s["t"] <= end]
    latencies = [v for t, v in stats.latencies if start < t - stats.started <= end]
    return {"rss_mib": round(statistics.mean(s["rss_mib"] for s in samples), 1) if samples else float("nan"),
            "p50_s": _pct(latencies, 50), "p95_s": _pct(latencies, 95), "requests": len(latencies)}


def report(stats: Stats, args: argparse.Namespace) -> dict[str, Any]:
    first = window(stats, args.warmup, args.warmup + args.window)
    last = window(stats, args.warmup + args.duration - args.window, args.warmup + args.duration)
    ratios = {k: round(last[k] / first[k], 3) for k in ("rss_mib", "p95_s") if first[k]}
    flat = all(abs(r - 1) <= args.tolerance for r in ratios.values())
    result = {"duration_s": args.duration, "warmup_s": args.warmup, "window_s": args.window, "rate_per_s": args.rate,
              "counts": stats.counts,
              "first": first, "last": last, "last_over_first": ratios, "flat_within_tolerance": flat,
              "problems": stats.problems[:50], "num_problems": len(stats.problems), "samples": stats.samples}
    print(f"\n{'':<14}{'first window':>14}{'last window':>14}{'last/first':>12}")
    for key in ("rss_mib", "p50_s", "p95_s", "requests"):
        ratio = f"{last[key] / first[key]:.3f}" if first[key] else "-"
        print(f"{key:<14}{first[key]:>14}{last[key]:>14}{ratio:>12}")
    print(f"requests: {stats.counts}; problems: {len(stats.problems)}; "
          f"flat within {args.tolerance:.0%}: {flat}; KV idle at the end: {bool(stats.counts.get('kv_idle_at_end'))}")
    for problem in stats.problems[:10]:
        print("  problem:", problem)
    return result


def start_server(args: argparse.Namespace, port: int, tmp: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "qwenstack", "serve", "--port", str(port), "--ui-db", str(tmp / "chats.db"),
               "--log-level", "warning", "--kv-cache-memory", args.kv_cache_memory]
    if args.model:
        command.append(args.model)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    log = (tmp / "server.log").open("wb")  # a file, not a pipe nobody reads: the server never blocks on it
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_healthy_sync(base: str, proc: subprocess.Popen, tmp: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {(tmp / 'server.log').read_text()[-2000:]}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("the server did not become healthy")
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=1800, help="seconds of traffic (default: 1800)")
    parser.add_argument("--window", type=float, default=300, help="seconds compared at start and end (default: 300)")
    parser.add_argument("--warmup", type=float, default=60,
                        help="seconds of the same traffic before the measured duration (default: 60)")
    parser.add_argument("--rate", type=float, default=4, help="requests started per second (default: 4)")
    parser.add_argument("--sample", type=float, default=10, help="seconds between samples (default: 10)")
    parser.add_argument("--tolerance", type=float, default=0.10, help="allowed last/first change (default: 0.10)")
    parser.add_argument("--model", default=None, help="model to serve (default: the bundled demo model)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server (default: 1)")
    parser.add_argument("--kv-cache-memory", default="128MiB",
                        help="the server's KV pool (default: 128MiB, small so that growth elsewhere shows in RSS)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the figures and samples as JSON here")
    args = parser.parse_args(argv)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        proc = start_server(args, port, Path(tmp))
        server_log = Path(tmp) / "server.log"
        try:
            wait_healthy_sync(base, proc, Path(tmp))
            model = httpx.get(base + "/v1/models").json()["data"][0]["id"]
            stats = asyncio.run(drive(base, model, proc.pid, args))
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
            log_tail = server_log.read_text(errors="replace")[-20000:]
    result = report(stats, args)
    result["server_log_tail"] = log_tail
    if log_tail.strip():
        print("server log (tail):\n" + log_tail[-3000:])
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    answered = not stats.problems and bool(stats.counts.get("kv_idle_at_end"))
    return 0 if answered else 1


if __name__ == "__main__":
    sys.exit(main())
