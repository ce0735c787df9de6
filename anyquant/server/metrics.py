"""Prometheus metrics of one server: HTTP requests, tokens, latencies and the engine's state.

Owns a private `CollectorRegistry` per app (so several apps in one process never clash), the
counters and histograms the engine thread feeds through the `EngineObserver` hooks, and a
collector that reads the engine thread's published `EngineStats` at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from anyquant.engine.engine import EngineStats

# Seconds; CPU decoding of real models sits in the tens of milliseconds to seconds per token.
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], EngineStats], model_name: str) -> None:
        self._stats = stats
        self._model = model_name

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        for name, doc, value in (
            ("anyquant_requests_waiting", "Requests waiting to be scheduled", s.num_waiting),
            ("anyquant_requests_running", "Requests in the running batch", s.num_running),
            ("anyquant_kv_pages_used", "KV cache pages held by requests", s.kv_pages_used),
            ("anyquant_kv_pages_total", "KV cache pages in the budget", s.kv_pages_total),
            (
                "anyquant_kv_cache_usage_ratio",
                "Fraction of KV cache pages in use",
                s.kv_pages_used / s.kv_pages_total if s.kv_pages_total else 0.0,
            ),
        ):
            gauge = GaugeMetricFamily(name, doc, labels=["model_name"])
            gauge.add_metric([self._model], float(value))
            yield gauge
        for name, doc, value in (
            (
                "anyquant_nonfinite_logits",
                "Requests failed because their logits were not finite",
                s.num_nonfinite_events,
            ),
            ("anyquant_preemptions", "Requests preempted for lack of KV pages", s.num_preemptions),
            (
                "anyquant_step_failures",
                "Engine steps that raised (their requests failed)",
                s.num_step_failures,
            ),
        ):
            counter = CounterMetricFamily(name, doc, labels=["model_name"])
            counter.add_metric([self._model], float(value))
            yield counter


class ServerMetrics:
    """Also an `EngineObserver`: the engine thread calls `first_token`, `inter_token` and
    `request_finished` (prometheus_client metrics are thread-safe)."""

    def __init__(self, model_name: str, stats: Callable[[], EngineStats]) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]
        r = self.registry
        self.http_requests = Counter(
            "anyquant_http_requests",
            "HTTP requests by path and status code",
            ["path", "status"],
            registry=r,
        )
        self.requests = Counter(
            "anyquant_requests",
            "Finished generation requests by finish reason",
            [*labels, "finish_reason"],
            registry=r,
        )
        self.prompt_tokens = Counter("anyquant_prompt_tokens", "Prompt tokens processed", labels, registry=r)
        self.generation_tokens = Counter("anyquant_generation_tokens", "Tokens generated", labels, registry=r)
        self.ttft = Histogram(
            "anyquant_time_to_first_token_seconds",
            "Time from admission to the first generated token",
            labels,
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "anyquant_inter_token_latency_seconds",
            "Time between consecutive generated tokens of a request",
            labels,
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "anyquant_request_latency_seconds",
            "Time from the HTTP request to its last byte, by endpoint",
            [*labels, "endpoint"],
            buckets=_E2E_BUCKETS,
            registry=r,
        )
        r.register(_EngineCollector(stats, model_name))

    # -- EngineObserver --------------------------------------------------------------------------
    def first_token(self, seconds: float) -> None:
        self.ttft.labels(self.model_name).observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self.itl.labels(self.model_name).observe(seconds)

    def request_finished(self, finish_reason: str, num_prompt_tokens: int, num_output_tokens: int) -> None:
        self.requests.labels(self.model_name, finish_reason).inc()
        self.prompt_tokens.labels(self.model_name).inc(num_prompt_tokens)
        self.generation_tokens.labels(self.model_name).inc(num_output_tokens)

    # -- HTTP ------------------------------------------------------------------------------------
    def http_request(self, path: str, status: int) -> None:
        self.http_requests.labels(path, str(status)).inc()

    def request_latency(self, endpoint: str, seconds: float) -> None:
        self.e2e.labels(self.model_name, endpoint).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
