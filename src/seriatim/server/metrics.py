"""Prometheus metrics of one server, in its own registry (so several servers can live in one process)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ..engine.async_engine import AsyncEngine

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)


class _EngineCollector(Collector):
    """Values read from the engine at scrape time: queue sizes, totals, KV-cache figures."""

    def __init__(self, source: Callable[[], AsyncEngine | None]):
        self.source = source  # -> the AsyncEngine, or None while the model loads

    def collect(self) -> Iterator:
        ae = self.source()
        if ae is None:
            return
        m = ae.engine_metrics  # a snapshot taken in the engine thread
        yield _metric(GaugeMetricFamily, "seriatim_requests_running", "Requests in the running batch", m.running)
        yield _metric(GaugeMetricFamily, "seriatim_requests_waiting", "Requests queued, not yet running", m.waiting)
        yield _metric(CounterMetricFamily, "seriatim_requests_finished", "Requests that ended with stop or length",
                      m.stats.finished)
        yield _metric(CounterMetricFamily, "seriatim_requests_aborted",
                      "Requests aborted (disconnect, timeout, shutdown, a grammar llguidance gave up on)",
                      m.stats.aborted)
        blocks = m.kv_blocks_used + m.kv_blocks_free
        yield _metric(CounterMetricFamily, "seriatim_engine_steps", "Forward passes run by the engine", m.stats.steps)
        yield _metric(CounterMetricFamily, "seriatim_spec_draft_tokens", "Speculative draft tokens verified",
                      m.stats.drafted)
        yield _metric(CounterMetricFamily, "seriatim_spec_accepted_tokens", "Speculative draft tokens accepted",
                      m.stats.accepted)
        # Tokens per target pass while speculating: (accepted + verifications) / verifications.
        yield _metric(CounterMetricFamily, "seriatim_spec_verifications",
                      "Forward passes that verified speculative drafts (each adds one token of its own)",
                      m.stats.verifications)
        yield _metric(CounterMetricFamily, "seriatim_forced_tokens",
                      "Tokens a grammar forced, appended without sampling (jump-forward)", m.stats.forced_tokens)
        yield _metric(GaugeMetricFamily, "seriatim_engine_step_tokens", "Tokens fed to the last forward pass",
                      m.stats.step_tokens)
        yield _metric(CounterMetricFamily, "seriatim_preemptions", "Sequences preempted to free KV memory",
                      m.preemptions)
        yield _metric(GaugeMetricFamily, "seriatim_kv_cache_usage_ratio", "Fraction of the KV-cache blocks in use",
                      m.kv_blocks_used / blocks if blocks else 0.0)
        yield _metric(GaugeMetricFamily, "seriatim_prefix_cache_hit_rate",
                      "Fraction of prompt tokens served from the prefix cache", m.prefix_hit_rate)


def _metric(family: type, name: str, doc: str, value: float):
    metric = family(name, doc)
    metric.add_metric([], value)
    return metric


class Metrics:
    def __init__(self, engine_source: Callable[[], AsyncEngine | None]):
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
