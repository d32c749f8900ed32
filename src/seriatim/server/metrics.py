"""Prometheus metrics of one server, in its own registry (so several servers can live in one process)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)


class _EngineCollector(Collector):
    """Values read from the engine at scrape time: queue sizes, totals, KV-cache figures."""

    def __init__(self, source: Callable[[], Any]):
        self.source = source  # -> the AsyncEngine, or None while the model loads

    def collect(self) -> Iterator:
        ae = self.source()
        counts = getattr(ae, "counts", None)
        running = GaugeMetricFamily("seriatim_requests_running", "Requests in the running batch")
        waiting = GaugeMetricFamily("seriatim_requests_waiting", "Requests queued, not yet running")
        running.add_metric([], counts.running if counts else 0)
        waiting.add_metric([], counts.waiting if counts else 0)
        yield running
        yield waiting
        for name, attr, doc in (("seriatim_requests_finished", "finished", "Requests that ended with stop or length"),
                                ("seriatim_requests_aborted", "aborted", "Requests aborted (disconnect, timeout, shutdown)")):
            c = CounterMetricFamily(name, doc)
            c.add_metric([], getattr(counts, attr, 0) if counts else 0)
            yield c
        m = getattr(ae, "engine_metrics", None)  # snapshot taken in the engine thread
        stats = getattr(m, "stats", None)
        for name, attr, doc in (("seriatim_engine_steps", "steps", "Forward passes run by the engine"),
                                ("seriatim_preemptions", "preemptions", "Sequences preempted to free KV memory")):
            value = _first_number(stats if attr == "steps" else m, (attr,))
            if value is not None:
                c = CounterMetricFamily(name, doc)
                c.add_metric([], value)
                yield c
        used, free = _first_number(m, ("kv_blocks_used",)), _first_number(m, ("kv_blocks_free",))
        usage = used / (used + free) if used is not None and free is not None and used + free > 0 else None
        hit_rate = _first_number(m, ("prefix_hit_rate", "prefix_cache_hit_rate"))
        for name, value, doc in (("seriatim_kv_cache_usage_ratio", usage, "Fraction of the KV-cache blocks in use"),
                                 ("seriatim_prefix_cache_hit_rate", hit_rate,
                                  "Fraction of prompt tokens served from the prefix cache")):
            if value is not None:
                g = GaugeMetricFamily(name, doc)
                g.add_metric([], value)
                yield g


def _first_number(obj: Any, attrs: tuple[str, ...]) -> float | None:
    for attr in attrs:
        v = obj.get(attr) if isinstance(obj, dict) else getattr(obj, attr, None)
        if callable(v):
            try:
                v = v()
            except Exception:  # noqa: BLE001 - a metric must never break a scrape
                continue
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None


class Metrics:
    def __init__(self, engine_source: Callable[[], Any]):
        disable_created_metrics()  # no `_created` series: they double the output and nobody reads them
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("seriatim_http_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("seriatim_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("seriatim_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("seriatim_time_to_first_token_seconds", "From arrival to the first generated token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("seriatim_inter_token_latency_seconds", "Time between consecutive generated tokens",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("seriatim_e2e_request_latency_seconds", "From arrival to the last token",
                             buckets=_E2E_BUCKETS, registry=r)
        r.register(_EngineCollector(engine_source))

    def render(self) -> bytes:
        return generate_latest(self.registry)
