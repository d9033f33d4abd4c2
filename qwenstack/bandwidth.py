"""How fast this machine reads weights, measured once and cached (~/.cache/qwenstack/bandwidth.json).

Single-stream decode reads every active weight once per token, so its speed is bytes per second divided
by bytes per token. Two figures per device:
- stream: the plain read bandwidth (a sum over a buffer far larger than the caches); divided into the
  bytes per token it gives the bound no implementation can beat;
- kernels: the rate at which the decode matrix-vector product of each weight format actually consumes
  weight bytes (bf16 F.linear, torch's int8 and int4 CPU kernels, float32), over matrices cycled so
  they never stay in cache. A kernel that computes more per byte (int4 unpacking) or uses the cores less
  well reads slower than the stream; these rates make the planner's "expected" figure.

Environment:
- QWENSTACK_CACHE_DIR: where the cache lives (default ~/.cache/qwenstack).
- QWENSTACK_BANDWIDTH_GBS: skip measuring; either one number (GB/s for everything) or
  "stream=20,bfloat16=14,int8=16,int4=12".
The cache is keyed by device, CPU model, torch thread count and torch version: a different thread count
is a different machine as far as decode speed goes.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

CACHE_ENV = "QWENSTACK_CACHE_DIR"
OVERRIDE_ENV = "QWENSTACK_BANDWIDTH_GBS"
KERNEL_FORMATS = ("bfloat16", "float32", "int8", "int4")


@dataclass
class Bandwidth:
    device: str  # "cpu" or the GPU's name
    stream: float  # bytes per second
    kernels: dict[str, float] = field(default_factory=dict)  # format -> weight bytes per second
    threads: int = 0
    measured_at: str = ""
    source: str = "measured"  # measured | cache | environment

    def rate(self, fmt: str) -> float:
        """Weight bytes per second for a format (int4-g32 reads like int4); the stream rate if unmeasured."""
        base = "int4" if fmt.startswith("int4") else fmt
        return self.kernels.get(base, self.stream)

    def describe(self) -> str:
        kernels = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in self.kernels.items())
        origin = {"measured": "measured now", "cache": f"measured {self.measured_at}",
                  "environment": f"from ${OVERRIDE_ENV}"}[self.source]
        return f"{self.device}: stream read {self.stream / 1e9:.1f} GB/s; decode kernels (GB/s) {kernels} ({origin})"


def cache_path() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "qwenstack")
    return Path(root) / "bandwidth.json"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _from_environment(device: str) -> Bandwidth | None:
    text = os.environ.get(OVERRIDE_ENV)
    if not text:
        return None
    try:
        if "=" not in text:
            value = float(text) * 1e9
            return Bandwidth(device, value, {k: value for k in KERNEL_FORMATS}, torch.get_num_threads(), "", "environment")
        rates = {k.strip(): float(v) * 1e9 for k, v in (part.split("=") for part in text.split(","))}
    except ValueError:
        raise ValueError(f"${OVERRIDE_ENV} must be a number of GB/s or 'stream=20,int8=16,...', got {text!r}") from None
    stream = rates.pop("stream", None) or max(rates.values())
    return Bandwidth(device, stream, rates, torch.get_num_threads(), "", "environment")


def _best_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure_cpu(buffer_mib: int = 512, repeats: int = 3, shape: tuple[int, int] = (4096, 4096)) -> Bandwidth:
    """Measures now (a few seconds): the stream rate and each format's decode GEMV read rate."""
    buf = torch.ones(buffer_mib * 2**20 // 4, dtype=torch.float32)
    stream = buf.numel() * 4 / _best_time(buf.sum, repeats)
    del buf
    n, k = shape
    kernels: dict[str, float] = {}
    for fmt in KERNEL_FORMATS:
        weights, matmul = _kernel_weights(fmt, n, k, buffer_mib)
        total = sum(w.numel() * w.element_size() for w in weights)

        def run() -> None:
            for w in weights:
                matmul(w)

        kernels[fmt] = total / _best_time(run, repeats)
        del weights
    return Bandwidth("cpu", stream, kernels, torch.get_num_threads(),
                     datetime.datetime.now().isoformat(timespec="seconds"), "measured")


def _kernel_weights(fmt: str, n: int, k: int, buffer_mib: int) -> tuple[list[torch.Tensor], Callable[[torch.Tensor], Any]]:
    """Distinct weight matrices of one format totalling buffer_mib, and the decode product on one of them."""
    if fmt in ("bfloat16", "float32"):
        dtype = getattr(torch, fmt)
        one = torch.randn(n, k).to(dtype)
        x = torch.randn(1, k, dtype=dtype)
        return _copies(one, buffer_mib), lambda w: F.linear(x, w)
    x = torch.randn(1, k, dtype=torch.bfloat16)
    if fmt == "int8":
        one = torch.randint(-128, 128, (n, k), dtype=torch.int8)
        scales = torch.rand(n, dtype=torch.bfloat16)
        return _copies(one, buffer_mib), lambda w: torch._weight_int8pack_mm(x, w, scales)
    group = 128
    one = torch._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32), 2)
    sz = torch.rand(k // group, n, 2, dtype=torch.bfloat16)
    return _copies(one, buffer_mib), lambda w: torch._weight_int4pack_mm_for_cpu(x, w, group, sz)


def _copies(one: torch.Tensor, buffer_mib: int) -> list[torch.Tensor]:
    count = max(2, buffer_mib * 2**20 // (one.numel() * one.element_size()))
    return [one.clone() for _ in range(count)]


def measure_gpu(index: int = 0, buffer_mib: int = 2048, repeats: int = 5) -> Bandwidth:
    """The stream read rate of a CUDA device (kernel rates are not measured: the figure is the bound)."""
    device = torch.device("cuda", index)
    buf = torch.ones(buffer_mib * 2**20 // 2, dtype=torch.bfloat16, device=device)

    def read() -> None:
        buf.sum()
        torch.cuda.synchronize(device)

    stream = buf.numel() * 2 / _best_time(read, repeats)
    return Bandwidth(torch.cuda.get_device_name(device), stream, {}, 0,
                     datetime.datetime.now().isoformat(timespec="seconds"), "measured")


def _cache_key(device: str) -> str:
    return f"{device}|{cpu_name()}|threads={torch.get_num_threads()}|torch={torch.__version__}"


def _cached(key: str, measure: Callable[[], Bandwidth], refresh: bool) -> Bandwidth:
    path = cache_path()
    try:
        cache = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    if not refresh and isinstance(cache.get(key), dict):
        try:
            return Bandwidth(**{**cache[key], "source": "cache"})
        except TypeError:
            pass  # an older record layout: measure again
    result = measure()
    cache[key] = asdict(result)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cache, indent=2) + "\n", encoding="utf-8")
    except OSError:
        pass  # a read-only home still gets its figure, just not cached
    return result


def cpu_bandwidth(refresh: bool = False) -> Bandwidth:
    """This machine's CPU figures: from the environment, else the cache, else measured (and cached)."""
    return _from_environment("cpu") or _cached(_cache_key("cpu"), measure_cpu, refresh)


def gpu_bandwidth(index: int = 0, refresh: bool = False) -> Bandwidth | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(index)
    return _from_environment(name) or _cached(_cache_key(f"cuda:{name}"), lambda: measure_gpu(index), refresh)
