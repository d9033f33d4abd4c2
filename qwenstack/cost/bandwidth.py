"""How fast this machine reads weights, measured once and cached (~/.cache/qwenstack/bandwidth.json).

Single-stream decode reads every active weight once per token, so its speed is bytes per second divided
by bytes per token. Two figures per device:
- stream: the plain read bandwidth (a sum over a buffer far larger than the caches, the best of torch's
  sum() and the same sum read as several streams per core, `read_rate`); divided into the bytes per token
  it gives the bound no implementation can beat;
- kernels: the rate at which the decode matrix-vector product of each weight format actually consumes
  weight bytes, in the form the runtime uses (bfloat16: the fastest of F.linear and qwenstack's native
  kernels, row-major and tile-packed, the usual pick of models/cpu_linear.py; int8: the native kernel
  where it builds, else torch's; int4: torch's; float32: F.linear), over matrices cycled so they never stay
  in cache. A kernel
  that computes more per byte (int4 unpacking) or uses the cores less well reads slower than the stream.
  The rate also depends on the row length (a matrix-vector product over short rows pays more per row):
  bfloat16 and int8 are measured at 1024 and 4096 columns and `rate(fmt, columns)` interpolates (in
  log2 of the columns) between them, so a 0.6B model (1024-wide) is not planned at a 4096-wide rate;
- overhead (CPU): what a decode step costs beyond reading weights (Python, small ops, attention on a
  short context), measured by decoding with tiny models built in memory: a fixed part per step, a part
  per layer, and for MoE layers a part per layer and per active expert (qwenstack/cost/step_overhead.py).
The kernel rates and the overhead make the planner's "expected" figure.

Environment:
- QWENSTACK_CACHE_DIR: where the cache lives (default ~/.cache/qwenstack).
- QWENSTACK_BANDWIDTH_GBS: skip measuring; either one number (GB/s for everything, no overhead) or
  "stream=20,bfloat16=14,int8=16,int4=12,step_ms=2,layer_ms=0.7,moe_layer_ms=1,expert_ms=0.1".
The cache is keyed by device, CPU model, torch thread count and torch version: a different thread count
is a different machine as far as decode speed goes.

A busy minute must not become the machine's rate: the CPU figures are measured in two passes and the best
of each kept; `spread` records how far the passes disagreed, or how far a kernel read faster than the
stream (impossible on a steady machine: the stream passes were slowed alike, so they agreed). A record whose spread is large is measured
again on its next use (up to MAX_MEASUREMENTS times) and merged, best figure per key, so the cache only ever
moves towards what the machine can do.
"""
from __future__ import annotations

import datetime
import functools
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

CACHE_ENV = "QWENSTACK_CACHE_DIR"
OVERRIDE_ENV = "QWENSTACK_BANDWIDTH_GBS"
KERNEL_FORMATS = ("bfloat16", "float32", "int8", "int4")
OVERHEAD_KEYS = ("step", "layer", "moe_layer", "expert")
# Part of the cache key: a change in what is measured (or in the kernels measured) invalidates old records.
MEASUREMENT_VERSION = 7  # 7: int4 measured in its tile-packed form where that is what runs
# Row lengths the main formats are also measured at ("bfloat16@1024"); the plain key is the default shape's.
SHORT_ROWS = 1024
ROW_DEPENDENT_FORMATS = ("bfloat16", "int8")
# Passes that disagree by more than this (relative to the best) mark a measurement as taken on a busy machine.
SPREAD_WARN = 0.2
# A kernel may beat the stream probe a little (prefetch, wider loads); by more than this, the stream figure
# was taken in a slow moment and the record is measured again.
KERNEL_ABOVE_STREAM = 0.25
MAX_MEASUREMENTS = 3


@dataclass
class Bandwidth:
    device: str  # "cpu" or the GPU's name
    stream: float  # bytes per second
    kernels: dict[str, float] = field(default_factory=dict)  # format -> weight bytes per second
    threads: int = 0
    measured_at: str = ""
    source: str = "measured"  # measured | cache | environment
    overhead: dict[str, float] = field(default_factory=dict)  # OVERHEAD_KEYS -> seconds (CPU; empty: none)
    spread: float = 0.0  # largest disagreement between measurement passes, as a fraction of the best figure
    measurements: int = 1  # how many measurements were merged into these figures

    def rate(self, fmt: str, columns: int | None = None) -> float:
        """Weight bytes per second for a format (int4-g32 reads like int4), for matrices of `columns` input
        features when the format was measured at two row lengths; the stream rate if unmeasured."""
        base = "int4" if fmt.startswith("int4") else fmt
        long_rate = self.kernels.get(base, self.stream)
        short_rate = self.kernels.get(f"{base}@{SHORT_ROWS}")
        long_cols = int(self.kernels.get(f"{base}@columns", 0))
        if columns is None or short_rate is None or long_cols <= SHORT_ROWS:
            return long_rate
        t = (math.log2(columns) - math.log2(SHORT_ROWS)) / (math.log2(long_cols) - math.log2(SHORT_ROWS))
        t = min(max(t, 0.0), 1.0)
        return short_rate + t * (long_rate - short_rate)

    def step_overhead(self, layers: int, moe_layers: int = 0, experts_per_token: int = 0) -> float:
        """Seconds a decode step spends beyond reading weights, for a model of this many layers (of which
        moe_layers are sparse, each running experts_per_token experts, a shared expert counted as one)."""
        o = self.overhead
        return (o.get("step", 0.0) + layers * o.get("layer", 0.0)
                + moe_layers * (o.get("moe_layer", 0.0) + experts_per_token * o.get("expert", 0.0)))

    def describe(self) -> str:
        kernels = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in self.kernels.items() if not k.endswith("@columns"))
        origin = {"measured": "measured now", "cache": f"measured {self.measured_at}",
                  "environment": f"from ${OVERRIDE_ENV}"}[self.source]
        text = f"{self.device}: stream read {self.stream / 1e9:.1f} GB/s; decode kernels (GB/s) {kernels}"
        if self.overhead:
            text += "; step overhead (ms) " + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in self.overhead.items())
        if self.spread > SPREAD_WARN:
            text += (f"; the measurement passes differed by up to {self.spread:.0%} (a busy machine: figures may be"
                     " low; they are measured again on the next plan)")
        return f"{text} ({origin})"

    def merged(self, other: "Bandwidth") -> "Bandwidth":
        """The best of two measurements of the same machine, key by key (overhead: the smaller)."""
        kernels = {k: max(self.kernels.get(k, 0.0), other.kernels.get(k, 0.0))
                   for k in {*self.kernels, *other.kernels}}
        overhead = {k: min(v for v in (self.overhead.get(k), other.overhead.get(k)) if v is not None)
                    for k in {*self.overhead, *other.overhead}}
        # The spread that matters now is whether the best figures agree: a new pair of passes that is
        # itself steady settles the record.
        return Bandwidth(self.device, max(self.stream, other.stream), kernels, other.threads, other.measured_at,
                         other.source, overhead, min(self.spread, other.spread),
                         self.measurements + other.measurements)


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
        values = {k.strip(): float(v) for k, v in (part.split("=") for part in text.split(","))}
    except ValueError:
        raise ValueError(f"${OVERRIDE_ENV} must be a number of GB/s or 'stream=20,int8=16,...', got {text!r}") from None
    overhead = {k[:-3]: values.pop(k) / 1e3 for k in list(values) if k.endswith("_ms") and k[:-3] in OVERHEAD_KEYS}
    rates = {k: v * 1e9 for k, v in values.items()}
    stream = rates.pop("stream", None) or max(rates.values(), default=0.0)
    if not stream:
        raise ValueError(f"${OVERRIDE_ENV} names no bandwidth, got {text!r}")
    return Bandwidth(device, stream, rates, torch.get_num_threads(), "", "environment", overhead)


def _best_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


# Streams per core the read-rate probe tries beside torch's sum() (kernels/memory_cpu.cpp).
PROBE_STREAMS = (4, 8, 16)


def read_rate(buf: torch.Tensor, repeats: int = 3) -> float:
    """Bytes per second for reading the 1-D float32 `buf` (far larger than the caches): the best of torch's
    sum(), one forward stream per thread, and, where the native kernels build, the same sum read as several
    streams per core, which is how the linear kernels read their weights and a core reads faster."""
    from qwenstack import kernels

    readers: list[Callable[[], Any]] = [buf.sum]
    if buf.device.type == "cpu" and kernels.stream_sum(buf[:1024], 1) is not None:
        readers += [functools.partial(kernels.stream_sum, buf, streams) for streams in PROBE_STREAMS]
    return buf.numel() * buf.element_size() / min(_best_time(read, repeats) for read in readers)


def measure_cpu(buffer_mib: int = 512, repeats: int = 3, shape: tuple[int, int] = (4096, 4096),
                overhead: bool = True, passes: int = 2) -> Bandwidth:
    """Measures now (a few seconds a pass): the stream rate, each format's decode GEMV read rate and (unless
    overhead=False) the per-step overhead. Each rate is the best of `passes` passes; `spread` says how far
    the passes disagreed."""
    n, k = shape
    shapes = [(fmt, n, k, fmt) for fmt in KERNEL_FORMATS]
    if k > SHORT_ROWS:
        shapes += [(fmt, n, SHORT_ROWS, f"{fmt}@{SHORT_ROWS}") for fmt in ROW_DEPENDENT_FORMATS]
    samples: dict[str, list[float]] = {}
    for _ in range(max(passes, 1)):
        buf = torch.empty(buffer_mib * 2**20 // 4, dtype=torch.float32).uniform_()  # distinct pages (see _distinct)
        samples.setdefault("stream", []).append(read_rate(buf, repeats))
        del buf
        for fmt, rows, columns, key in shapes:
            rates = []
            for weights, matmul in _kernel_forms(fmt, rows, columns, buffer_mib):
                total = sum(w.numel() * w.element_size() for w in weights)
                rates.append(total / _best_time(lambda: [matmul(w) for w in weights], repeats))
                del weights
            samples.setdefault(key, []).append(max(rates))
    best = {key: max(values) for key, values in samples.items()}
    spread = max(1.0 - min(values) / max(values) for values in samples.values())
    # Passes that were all slowed alike agree with each other; but no kernel reads memory faster than the
    # machine streams it, so a kernel rate well above the stream rate says the stream passes were disturbed.
    fastest_kernel = max(v for k, v in best.items() if k != "stream")
    if fastest_kernel > best["stream"] * (1 + KERNEL_ABOVE_STREAM):
        spread = max(spread, 1.0 - best["stream"] / fastest_kernel)
    stream = best.pop("stream")
    kernels = dict(best)
    if k > SHORT_ROWS:
        kernels.update({f"{fmt}@columns": float(k) for fmt in ROW_DEPENDENT_FORMATS})
    step_overhead = {}
    if overhead:
        from qwenstack.cost.step_overhead import measure_step_overhead

        step_overhead = measure_step_overhead()
    return Bandwidth("cpu", stream, kernels, torch.get_num_threads(),
                     datetime.datetime.now().isoformat(timespec="seconds"), "measured", step_overhead, spread)


WeightForm = tuple[list[torch.Tensor], Callable[[torch.Tensor], Any]]


def _kernel_forms(fmt: str, n: int, k: int, buffer_mib: int) -> Iterator[WeightForm]:
    """The forms the runtime may give [n, k] weights of one format, one at a time (the caller drops each
    form's weights before the next is made, so at most buffer_mib is held): distinct matrices totalling
    buffer_mib in that form's layout, and its decode product (the fastest form counts). Every matrix has its
    own random contents: copies of one matrix can share physical pages (a hypervisor merging identical pages)
    and then read from cache."""
    from qwenstack import kernels

    native = kernels.linear_rows_available()
    if fmt in ("bfloat16", "float32"):
        dtype = getattr(torch, fmt)
        x = torch.randn(1, k, dtype=dtype)
        plain = _distinct(lambda: torch.empty(n, k, dtype=dtype).uniform_(-1, 1), buffer_mib)
        yield plain, lambda w: F.linear(x, w)
        if fmt == "bfloat16" and native:
            yield plain, lambda w: kernels.linear_rows(x, w)
            tiles = kernels.can_tile(plain[0])  # models/cpu_linear.py's native form stores these tile-packed
            del plain
            if tiles:
                packed = _distinct(lambda: kernels.pack_tiles(torch.empty(n, k, dtype=dtype).uniform_(-1, 1)),
                                   buffer_mib)
                yield packed, lambda w: kernels.linear_tiled(x, w)
        return
    x = torch.randn(1, k, dtype=torch.bfloat16)
    if fmt == "int8":
        scales = torch.rand(n, dtype=torch.bfloat16)
        if kernels.int8_tiles_preferred() and kernels.can_tile_int8((n, k)):  # what formats.py runs here
            packed = _distinct(lambda: kernels.pack_tiles_int8(torch.randint(-128, 128, (n, k), dtype=torch.int8)),
                               buffer_mib)
            yield packed, lambda w: kernels.linear_tiled_int8(x, w, scales)
            return
        weights = _distinct(lambda: torch.randint(-128, 128, (n, k), dtype=torch.int8), buffer_mib)
        if native:
            yield weights, lambda w: kernels.linear_rows(x, w, scales)
        else:
            yield weights, lambda w: torch._weight_int8pack_mm(x, w, scales)
        return
    group = 128
    sz = torch.rand(k // group, n, 2, dtype=torch.bfloat16)
    if kernels.int4_tiles_preferred() and kernels.can_tile_int4((n, k), group):  # what formats.py runs here
        tiled_sz = kernels.pack_scale_zeros_int4(sz)
        packed = _distinct(lambda: kernels.pack_tiles_int4(torch.randint(0, 16, (n, k), dtype=torch.uint8)),
                           buffer_mib)
        yield packed, lambda w: kernels.linear_tiled_int4(x, w, tiled_sz)
        return
    packed = _distinct(lambda: torch._convert_weight_to_int4pack_for_cpu(
        torch.randint(0, 16, (n, k), dtype=torch.int32), 2), buffer_mib)
    yield packed, lambda w: torch._weight_int4pack_mm_for_cpu(x, w, group, sz)


def _distinct(make: Callable[[], torch.Tensor], buffer_mib: int) -> list[torch.Tensor]:
    first = make()
    count = max(2, buffer_mib * 2**20 // (first.numel() * first.element_size()))
    return [first] + [make() for _ in range(count - 1)]


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
    return (f"{device}|{cpu_name()}|threads={torch.get_num_threads()}|torch={torch.__version__}"
            f"|v{MEASUREMENT_VERSION}")


def _cached(key: str, measure: Callable[[], Bandwidth], refresh: bool) -> Bandwidth:
    path = cache_path()
    try:
        cache = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    previous = None
    if isinstance(cache.get(key), dict):
        try:
            previous = Bandwidth(**{**cache[key], "source": "cache"})
        except TypeError:
            pass  # an older record layout: measure again
    settled = previous is not None and (previous.spread <= SPREAD_WARN
                                        or previous.measurements >= MAX_MEASUREMENTS)
    if previous is not None and settled and not refresh:
        return previous
    result = measure()
    if previous is not None and not refresh:
        result = previous.merged(result)  # an unsettled record: keep the best of both
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
