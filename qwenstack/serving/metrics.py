"""Prometheus metrics under vLLM's names with our prefix (`qwenstack:`), labelled `model_name`, so existing
dashboards and routers read them unchanged.

Decisions:
- One CollectorRegistry per app (no process-wide state: two servers in one process, as the tests run,
  keep separate counts).
- Latencies are measured in the serving layer, per request: time to first token from the moment the
  HTTP request was read (tokenisation and queueing included, as vLLM counts it), inter-token latency
  between outputs, end-to-end at the end. Queue time comes from the engine's own timestamps.
- Engine state (running, waiting, KV usage, prefix cache, token counters) is read from
  `LLMEngine.stats()` at scrape time by a custom collector: nothing to keep in sync.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from qwenstack.engine.outputs import RequestOutput

log = logging.getLogger("qwenstack.server")

PREFIX = "qwenstack:"
# vLLM's buckets, so percentiles compare across servers.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)


class _EngineCollector(Collector):
    def __init__(self, engines: Callable[[], dict[str, object]]) -> None:
        self.engines = engines  # model name -> LLMEngine

    def collect(self) -> Iterable[Metric]:
        gauges = {
            "num_requests_running": ("Requests in the running batch.", "num_running"),
            "num_requests_waiting": ("Requests waiting to be scheduled.", "num_waiting"),
            "kv_cache_usage_perc": ("Fraction of KV-cache blocks in use (0-1).", "kv_usage"),
        }
        counters = {
            "prefix_cache_queries": ("Prompt tokens looked up in the prefix cache.", "prefix_cache_queries"),
            "prefix_cache_hits": ("Prompt tokens served from the prefix cache.", "prefix_cache_hits"),
            "prompt_tokens": ("Prompt tokens admitted.", "prompt_tokens"),
            "generation_tokens": ("Tokens generated.", "generation_tokens"),
            "num_preemptions": ("Sequences preempted for lack of KV blocks.", "preemptions"),
            # speculative decoding (acceptance rate = accepted / draft tokens); 0 when it is off
            "spec_decode_num_draft_tokens": ("Draft tokens verified.", "spec_draft_tokens"),
            "spec_decode_num_accepted_tokens": ("Draft tokens accepted.", "spec_accepted_tokens"),
        }
        families: dict[str, Metric] = {}
        for name, (doc, _) in gauges.items():
            families[name] = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
        for name, (doc, _) in counters.items():
            families[name] = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
        for model_name, engine in self.engines().items():
            try:
                stats = engine.stats()  # type: ignore[attr-defined]
            except Exception:  # read while the engine thread mutates: skip this scrape for this model
                log.debug("engine stats unavailable for %s", model_name, exc_info=True)
                continue
            for name, (_, key) in {**gauges, **counters}.items():
                families[name].add_metric([model_name], float(stats.get(key, 0)))
            replica_stats = getattr(engine, "replica_stats", None)  # data-parallel replicas (serving/replicas.py)
            if replica_stats is not None:
                yield from _replica_families(model_name, replica_stats())
        yield from families.values()


def _replica_families(model_name: str, per_replica: list[dict[str, float]]) -> Iterable[Metric]:
    """Per-replica counts of a data-parallel model: where requests were routed and where the cache hit."""
    keys = {
        "replica_routed_requests": ("Requests the router sent to this replica.", "routed_requests"),
        "replica_prefix_routed_requests": ("Requests sent here because this replica held their prefix.",
                                           "prefix_routed_requests"),
        "replica_prefix_cache_hits": ("Prompt tokens this replica served from its prefix cache.", "prefix_cache_hits"),
        "replica_num_requests_running": ("Requests in this replica's running batch.", "num_running"),
        "replica_generation_tokens": ("Tokens this replica generated.", "generation_tokens"),
    }
    for name, (doc, key) in keys.items():
        family = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name", "replica"])
        for i, stats in enumerate(per_replica):
            family.add_metric([model_name, str(i)], float(stats.get(key, 0)))
        yield family


class ServerMetrics:
    def __init__(self, engines: Callable[[], dict[str, object]]) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time to first token.", labels,
                              registry=self.registry, buckets=TTFT_BUCKETS)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between output tokens.", labels,
                             registry=self.registry, buckets=ITL_BUCKETS)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "End-to-end request latency.", labels,
                             registry=self.registry, buckets=REQUEST_BUCKETS)
        self.queue = Histogram(PREFIX + "request_queue_time_seconds", "Time spent waiting to be scheduled.", labels,
                               registry=self.registry, buckets=REQUEST_BUCKETS)
        self.success = Counter(PREFIX + "request_success", "Finished requests by finish reason (abort: gone early).",
                               labels + ["finished_reason"], registry=self.registry)
        self.registry.register(_EngineCollector(engines))

    def track(self, model_name: str, arrival: float | None = None) -> "RequestTracker":
        return RequestTracker(self, model_name, arrival if arrival is not None else time.monotonic())

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTracker:
    """Latency bookkeeping of one HTTP request (which may carry several engine requests)."""

    def __init__(self, metrics: ServerMetrics, model_name: str, arrival: float) -> None:
        self.metrics = metrics
        self.model = model_name
        self.arrival = arrival
        self.first_token: float | None = None
        self.last: dict[str, float] = {}  # engine request id -> time of its last output
        self.finished: set[str] = set()

    def on_output(self, out: RequestOutput) -> None:
        now = time.monotonic()
        new_tokens = any(c.delta_token_ids for c in out.outputs)
        if not new_tokens:
            return
        if self.first_token is None:
            self.first_token = now
            self.metrics.ttft.labels(self.model).observe(now - self.arrival)
        previous = self.last.get(out.request_id)
        if previous is not None:
            itl = self.metrics.itl.labels(self.model)
            for c in out.outputs:
                if c.delta_token_ids:  # one step may bring several tokens (a sample catching up)
                    gap = (now - previous) / len(c.delta_token_ids)
                    for _ in c.delta_token_ids:
                        itl.observe(gap)
        self.last[out.request_id] = now

    def on_finished(self, out: RequestOutput) -> None:
        m = out.metrics
        if m.first_scheduled_time is not None:
            self.metrics.queue.labels(self.model).observe(max(0.0, m.first_scheduled_time - m.arrival_time))
        self.finished.add(out.request_id)
        reason = out.outputs[0].finish_reason if out.outputs else None
        self.metrics.success.labels(self.model, reason or "abort").inc()

    def done(self, num_requests: int = 1) -> None:
        """At the end of the HTTP request; engine requests that never finished count as aborted."""
        self.metrics.e2e.labels(self.model).observe(time.monotonic() - self.arrival)
        for _ in range(num_requests - len(self.finished)):
            self.metrics.success.labels(self.model, "abort").inc()
