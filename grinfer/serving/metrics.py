"""Prometheus metrics: request latency and errors observed by the adapters, engine state read at scrape."""

from __future__ import annotations

import torch
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class EngineCollector:
    """Reads the engine's plain stats at scrape time: queue, running, KV cache, device memory."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        stats = self.engine.stats()
        kv = stats["kv_cache"]
        yield GaugeMetricFamily("grinfer_queue_depth", "Requests waiting in the engine queue", stats["waiting"])
        yield GaugeMetricFamily("grinfer_running_requests", "Requests being computed", stats["running"])
        for name in ("hits", "partial_hits", "misses", "evictions", "host_hits", "host_evictions"):
            yield GaugeMetricFamily(f"grinfer_kv_cache_{name}", f"KV cache {name.replace('_', ' ')} so far",
                                    kv[name])
        yield GaugeMetricFamily("grinfer_kv_cache_occupancy", "Fraction of KV blocks in use", kv["occupancy"])
        yield GaugeMetricFamily("grinfer_kv_cache_users", "Users with K/V on the device", kv["users"])
        device = self.engine.core.device
        if device.type == "cuda":
            yield GaugeMetricFamily("grinfer_device_memory_bytes", "Device memory allocated",
                                    torch.cuda.memory_allocated(device))


class Metrics:
    """The server's metric set in its own registry (so tests and several apps don't collide)."""

    def __init__(self, engine, backend: str):
        self.registry = CollectorRegistry()
        self.backend = backend
        self.latency = Histogram("grinfer_request_seconds", "Request latency by endpoint and backend",
                                 ["endpoint", "backend"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.errors = Counter("grinfer_errors", "Errors by endpoint and kind", ["endpoint", "kind"],
                              registry=self.registry)
        self.cache_status = Counter("grinfer_rank_context_cache", "Context K/V cache status per ranked request",
                                    ["status"], registry=self.registry)
        self.batch_tokens = Histogram("grinfer_batch_tokens", "Tokens computed per engine step",
                                      buckets=(16, 64, 256, 1024, 4096, 16384, 65536), registry=self.registry)
        self.batch_requests = Histogram("grinfer_batch_requests", "Requests per engine step",
                                        buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        self.fallbacks = Counter("grinfer_backend_fallbacks", "Batches re-run on the eager backend",
                                 ["backend"], registry=self.registry)
        self.registry.register(EngineCollector(engine))

    def on_step(self, step: dict) -> None:
        self.batch_tokens.observe(step["tokens"])
        self.batch_requests.observe(step["requests"])

    def observe(self, endpoint: str, seconds: float) -> None:
        self.latency.labels(endpoint, self.backend).observe(seconds)

    def error(self, endpoint: str, kind: str) -> None:
        self.errors.labels(endpoint, kind).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
