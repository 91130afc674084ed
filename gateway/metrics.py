"""Prometheus metrics (``prometheus-client``), served at ``GET /metrics``.

Two sources. What the gateway sees of each request it serves: requests by outcome, tokens prompted /
restored from the cache / prefilled / generated, cache hits by kind and tier, time to first token and
time per output token. And what the broker and the cache store hold, read at each scrape: per model
its state, queue depth, running requests and worker restarts; per cache tier its bytes and rows.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from erllama.cachestore.client import CacheClient
from erllama.gateway.config import GatewayConfig
from erllama.protocol import CompletionResult, ErllamaError

log = logging.getLogger(__name__)

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS_S: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS_S: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
CACHESTORE_TIMEOUT_S: Final = 1.0


@dataclass(slots=True)
class Snapshot:
    """The broker's and the cache store's view, taken just before a scrape renders."""

    models: list[dict[str, Any]] = field(default_factory=list)
    tiers: dict[str, dict[str, Any]] = field(default_factory=dict)
    broker_up: bool = False


class _ScrapeCollector(Collector):
    def __init__(self) -> None:
        self.snapshot = Snapshot()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snap = self.snapshot
        up = GaugeMetricFamily("erllama_broker_up", "1 when the broker answered the last scrape")
        up.add_metric([], 1.0 if snap.broker_up else 0.0)
        yield up
        per_model = {
            "queue_depth": ("erllama_queue_depth", "Requests accepted and not finished (waiting + running)"),
            "pending_len": ("erllama_waiting_requests", "Requests waiting for a free sequence"),
            "running": ("erllama_running_requests", "Requests running in the model's worker"),
            "slots": ("erllama_slots", "Sequences the model's worker runs at once"),
            "restarts": ("erllama_worker_restarts", "Times the model's worker was restarted"),
        }
        for key, (name, doc) in per_model.items():
            family = GaugeMetricFamily(name, doc, labels=["model"])
            for m in snap.models:
                family.add_metric([m["id"]], float(m.get(key) or 0))
            yield family
        ready = GaugeMetricFamily(
            "erllama_model_ready", "1 when the model is ready", labels=["model", "state"]
        )
        for m in snap.models:
            ready.add_metric([m["id"], m["state"]], 1.0 if m["state"] == "ready" else 0.0)
        yield ready
        tier_bytes = GaugeMetricFamily("erllama_cache_tier_bytes", "Bytes of KV rows held", labels=["tier"])
        tier_rows = GaugeMetricFamily("erllama_cache_tier_rows", "KV rows held", labels=["tier"])
        tier_budget = GaugeMetricFamily(
            "erllama_cache_tier_budget_bytes", "The tier's budget", labels=["tier"]
        )
        for name, t in snap.tiers.items():
            tier_bytes.add_metric([name], float(t.get("bytes", 0)))
            tier_rows.add_metric([name], float(t.get("rows", 0)))
            tier_budget.add_metric([name], float(t.get("budget", 0)))
        yield from (tier_bytes, tier_rows, tier_budget)


class GatewayMetrics:
    """The gateway's own registry (never the process-global one: two apps in a process stay apart)."""

    def __init__(self, cfg: GatewayConfig):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "erllama_requests",
            "HTTP requests served, by outcome",
            ["model", "endpoint", "outcome"],
            registry=r,
        )
        self.tokens = Counter(
            "erllama_tokens",
            "Tokens by kind: prompted, restored (from the cache), prefilled, generated",
            ["model", "kind"],
            registry=r,
        )
        self.cache_hits = Counter(
            "erllama_cache_hits", "Requests by cache hit kind and tier", ["model", "kind", "tier"], registry=r
        )
        self.ttft = Histogram(
            "erllama_time_to_first_token_seconds",
            "Broker receipt to the first sampled token",
            ["model"],
            buckets=TTFT_BUCKETS_S,
            registry=r,
        )
        self.time_per_token = Histogram(
            "erllama_time_per_output_token_seconds",
            "Generation time per output token after the first, one observation per request",
            ["model"],
            buckets=TOKEN_BUCKETS_S,
            registry=r,
        )
        self._scrape = _ScrapeCollector()
        r.register(self._scrape)
        self._cache: CacheClient | None = None
        self._cache_endpoint = cfg.cachestore
        self._cache_lock = threading.Lock()  # scrapes may overlap; the socket is used by one thread at a time

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()

    def observe(self, model: str, endpoint: str, result: CompletionResult) -> None:
        """Count a finished request."""
        s = result.stats
        restored = int(result.cache_delta.get("read", 0))
        self.requests.labels(model, endpoint, f"finished_{result.finish_reason}").inc()
        self.tokens.labels(model, "prompted").inc(s.prompt_tokens)
        self.tokens.labels(model, "restored").inc(restored)
        self.tokens.labels(model, "prefilled").inc(max(s.prompt_tokens - restored, 0))
        self.tokens.labels(model, "generated").inc(s.completion_tokens)
        if result.cache_hit_kind is not None:
            self.cache_hits.labels(model, result.cache_hit_kind.value, result.cache_tier or "none").inc()
        if s.completion_tokens:
            self.ttft.labels(model).observe(s.ttft_ms / 1000.0)
        if s.completion_tokens > 1:
            self.time_per_token.labels(model).observe(s.generation_ms / 1000.0 / (s.completion_tokens - 1))

    def failed(self, model: str, endpoint: str, code: str) -> None:
        self.requests.labels(model, endpoint, f"error_{code}").inc()

    async def render(self, list_models: Any) -> bytes:
        """The exposition text; ``list_models`` is the broker call that gives the per-model rows."""
        snap = Snapshot()
        try:
            snap.models = await list_models()
            snap.broker_up = True
        except ErllamaError as err:
            log.warning("metrics: the broker did not answer: %s", err)
        snap.tiers = await asyncio.to_thread(self._tiers)
        self._scrape.snapshot = snap
        return generate_latest(self.registry)

    def _tiers(self) -> dict[str, dict[str, Any]]:
        try:
            with self._cache_lock:
                return self._cache_stats()
        except ErllamaError as err:
            log.info("metrics: no cache store stats: %s", err)
            return {}

    def _cache_stats(self) -> dict[str, dict[str, Any]]:
        if self._cache is None:
            self._cache = CacheClient(self._cache_endpoint, timeout_s=CACHESTORE_TIMEOUT_S)
        return dict(self._cache.stats()["tiers"])
