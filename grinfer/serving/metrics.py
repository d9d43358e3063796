"""Prometheus metrics: request latency and errors observed by the adapters, engine state read at scrape.

Names follow Prometheus conventions: running counts are counters (`_total`), levels are gauges,
sizes and durations are histograms (`_seconds`, `_bytes`). The registry also carries the standard
`process_*`, `python_*` (GC, platform) collectors; `_created` series are not exported. The Grafana
dashboard in deploy/grafana/ queries these names (tests/serving/test_prometheus_metrics.py checks it).
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from typing import Any

import prometheus_client
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from starlette.routing import Match

from grinfer.serving.models_metrics import model_set_metrics
from grinfer.storage.resilient import health_of

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
PHASE_BUCKETS = (2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
UNMATCHED = "unmatched"  # the endpoint label of requests that matched no route (bounded label values)
KV_COUNTERS = {"hits": "Context lookups served whole from the KV cache",
               "partial_hits": "Context lookups that reused a cached prefix",
               "misses": "Context lookups with nothing cached",
               "evictions": "KV cache entries evicted from the device pool",
               "host_hits": "KV cache entries restored from the host tier",
               "host_evictions": "KV cache entries pushed out of the host tier (to the disk tier, if any)",
               "disk_hits": "KV cache entries restored from the disk tier",
               "disk_evictions": "KV cache entries dropped from the disk tier"}


class EngineCollector:
    """Reads the engine's plain stats at scrape time: queue, running, KV cache, device memory. An engine set
    (several devices, serving/engine_set.py) gives one series per engine, labelled `engine` (its index) and
    `device`, plus its ring: who is in it, who left and rejoined, and the requests re-hashed away from home."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        stats = self.engine.stats()
        yield from model_set_metrics(stats)  # arms, versions, shadow, consistency check (serving/models.py)
        engines = stats.get("engines")
        if engines is None:
            yield from engine_families([([], stats)], [])
            return
        members = [([str(e["engine"]), e["device"]], e) for e in engines]
        yield from engine_families(members, ["engine", "device"])
        yield from ring_families(members)


def _family(kind, name: str, doc: str, labels: list[str], members, value) -> Metric:
    """One metric family with a sample per member ((label values, stats)), `value(stats)` its value."""
    family = kind(name, doc, labels=labels)
    for values, stats in members:
        family.add_metric(values, value(stats))
    return family


def engine_families(members: list[tuple[list[str], dict]], labels: list[str]):
    """The engine metrics of each member (label values, Engine.stats()), one family per metric."""
    def gauge(name, doc, value):
        return _family(GaugeMetricFamily, name, doc, labels, members, value)

    def counter(name, doc, value):
        return _family(CounterMetricFamily, name, doc, labels, members, value)

    yield gauge("grinfer_queue_depth", "Requests waiting in the engine queue", lambda s: s["waiting"])
    yield gauge("grinfer_running_requests", "Requests being computed", lambda s: s["running"])
    for name, doc in KV_COUNTERS.items():
        yield counter(f"grinfer_kv_cache_{name}", doc, lambda s, n=name: s["kv_cache"][n])
    yield gauge("grinfer_kv_cache_occupancy", "Fraction of KV blocks in use", lambda s: s["kv_cache"]["occupancy"])
    yield gauge("grinfer_kv_cache_users", "Users with K/V on the device", lambda s: s["kv_cache"]["users"])
    yield gauge("grinfer_kv_cache_host_bytes", "Bytes of K/V held in the host tier",
                lambda s: s["kv_cache"]["host_bytes_used"])
    yield gauge("grinfer_kv_cache_disk_bytes", "Bytes of K/V held in the disk tier (one tier per host: every "
                "engine of a set reports the same)", lambda s: s["kv_cache"]["disk_bytes_used"])
    by_device = labels if "device" in labels else [*labels, "device"]
    memory = GaugeMetricFamily("grinfer_device_memory_bytes",
                               "Device memory the engine holds (CUDA: allocated; CPU: weights + KV pool)",
                               labels=by_device)
    for values, stats in members:
        memory.add_metric(values if "device" in labels else [*values, stats["device"]], stats["device_bytes"])
    yield memory
    yield counter("grinfer_engine_failures", "Engine steps or retrieval batches that failed", lambda s: s["failures"])
    yield from retrieval_cache_metrics(members, labels)
    yield from backend_metrics(members, labels)
    yield from embedding_metrics(members, labels)
    graphs = [(values, stats["backend"]) for values, stats in members if stats["backend"]]
    if graphs:  # backends with CUDA graphs
        yield _family(GaugeMetricFamily, "grinfer_cuda_graphs", "CUDA graphs held (one per shape bucket)", labels,
                      graphs, lambda g: g["graphs"])
        yield _family(GaugeMetricFamily, "grinfer_cuda_graphs_pending", "Shape buckets waiting for an idle-time "
                      "capture", labels, graphs, lambda g: g["pending"])
        yield _family(CounterMetricFamily, "grinfer_cuda_graph_capture_failures", "CUDA-graph captures that failed "
                      "(their buckets run without graphs)", labels, graphs, lambda g: g["capture_failures"])
        yield _family(CounterMetricFamily, "grinfer_eager_steps", "Fused steps run without a graph (bucket pending "
                      "or failed)", labels, graphs, lambda g: g["eager_steps"])


RETRIEVAL_COUNTERS = {"hits": "Retrieval history lookups served whole from the history K/V cache",
                      "partial_hits": "Retrieval history lookups that reused a cached prefix (new events appended)",
                      "misses": "Retrieval history lookups with nothing cached",
                      "evictions": "Retrieval history K/V entries evicted from their pool"}


def retrieval_cache_metrics(members: list[tuple[list[str], dict]], labels: list[str]):
    """The retrieval model's history K/V cache (engine/retrieval_cache.py), for the members that have one."""
    cached = [(values, stats["retrieval_cache"]) for values, stats in members if stats.get("retrieval_cache")]
    if not cached:
        return
    for name, doc in RETRIEVAL_COUNTERS.items():
        yield _family(CounterMetricFamily, f"grinfer_retrieval_cache_{name}", doc, labels, cached,
                      lambda c, n=name: c[n])
    yield _family(GaugeMetricFamily, "grinfer_retrieval_cache_occupancy", "Fraction of the history K/V pool's "
                  "blocks in use", labels, cached, lambda c: c["occupancy"])
    yield _family(GaugeMetricFamily, "grinfer_retrieval_cache_users", "Users with history K/V cached", labels,
                  cached, lambda c: c["users"])


def ring_families(members: list[tuple[list[str], dict]]):
    """An engine set's ring, per engine: in it now, times it left and rejoined, requests dispatched to it, and
    requests of its users served by another engine while it was out."""
    labels = ["engine", "device"]
    yield _family(GaugeMetricFamily, "grinfer_engine_in_ring", "1 while users are dispatched to this engine",
                  labels, members, lambda s: float(s["in_ring"]))
    yield _family(CounterMetricFamily, "grinfer_engine_ring_leaves", "Times the engine left the ring (its health "
                  "failed)", labels, members, lambda s: s["left"])
    yield _family(CounterMetricFamily, "grinfer_engine_ring_joins", "Times the engine rejoined the ring (healthy "
                  "again)", labels, members, lambda s: s["joined"])
    yield _family(CounterMetricFamily, "grinfer_engine_dispatched", "Rank requests dispatched to the engine",
                  labels, members, lambda s: s["dispatched"])
    yield _family(CounterMetricFamily, "grinfer_engine_rehashed", "Rank requests of the engine's users served by "
                  "another engine while it was out of the ring", labels, members, lambda s: s["rehashed"])


def embedding_metrics(members: list[tuple[list[str], dict]], labels: list[str]):
    """Each member's served embedding tables (grinfer.embedding): ids looked up, the device row cache's hit
    ratio (distinct rows) and its bytes, labelled `table`."""
    tables = [([*values, name], t) for values, stats in members for name, t in stats.get("embeddings", {}).items()]
    if not tables:
        return
    labels = [*labels, "table"]
    yield _family(CounterMetricFamily, "grinfer_embedding_lookups", "Ids looked up in a served embedding table",
                  labels, tables, lambda t: t["lookups"])
    yield _family(GaugeMetricFamily, "grinfer_embedding_cache_hit_ratio", "Distinct rows served from the device "
                  "row cache over all distinct rows looked up", labels, tables, lambda t: t["hit_ratio"])
    yield _family(GaugeMetricFamily, "grinfer_embedding_cache_bytes", "Device bytes of a table's row cache", labels,
                  tables, lambda t: t["bytes"])


def backend_metrics(members: list[tuple[list[str], dict]], labels: list[str]):
    """The strategy's metrics of each member: each backend's probe (auto) and health, the active one, fallbacks."""
    info = GaugeMetricFamily("grinfer_backend_info", "1 per backend of the chain (and every probed one): healthy "
                             "(its breaker closed) and its probe time in ms (auto)",
                             labels=[*labels, "backend", "healthy", "probe_ms"])
    active = GaugeMetricFamily("grinfer_backend_active", "1 for the backend steps run on now",
                               labels=[*labels, "backend"])
    fallbacks = CounterMetricFamily("grinfer_backend_fallbacks", "Steps re-run on the next backend, by why",
                                    labels=[*labels, "from", "to", "reason"])
    found = False
    for values, stats in members:
        strategy, probes = stats.get("strategy"), {p["backend"]: p for p in stats.get("probes", [])}
        if not strategy:
            continue
        found = True
        chain = {b["backend"]: b["healthy"] for b in strategy["backends"]}
        for name in dict.fromkeys([*probes, *chain]):
            healthy = chain.get(name, probes.get(name, {}).get("healthy", False))
            ms = probes.get(name, {}).get("probe_ms")
            info.add_metric([*values, name, str(bool(healthy)).lower(), "" if ms is None else f"{ms:.2f}"], 1.0)
        for name in chain:
            active.add_metric([*values, name], float(name == strategy["active"]))
        for f in strategy["fallbacks"]:
            fallbacks.add_metric([*values, f["from"], f["to"], f["reason"]], f["count"])
    if found:
        yield from (info, active, fallbacks)


class DependencyCollector:
    """The store's and the cache's breakers (degraded 0/1, failures counted) and the admission's state, read at
    scrape time."""

    def __init__(self, service):
        self.service = service

    def collect(self):
        for name, part in (("cache", self.service.cache), ("store", self.service.store)):
            health = health_of(part)
            yield GaugeMetricFamily(f"grinfer_{name}_degraded", f"1 while the {name} is failing and bypassed by a "
                                    "breaker (cache: served uncached; store: 503)", float(health["degraded"]))
            yield CounterMetricFamily(f"grinfer_{name}_errors", f"Calls to the {name} that failed (outages)",
                                      health["errors"])
        gate = self.service.admission  # admission at the door (admission.py); refusals: grinfer_errors kind overloaded
        yield GaugeMetricFamily("grinfer_admission_in_flight", "Ranking requests admitted and not answered yet",
                                gate.in_flight)
        yield GaugeMetricFamily("grinfer_admission_bound", "Ranking requests that may be in flight now (0: no bound)",
                                gate.bound() or 0)
        yield GaugeMetricFamily("grinfer_admission_rate", "Measured serving capacity (requests a second) the bound "
                                "is sized from", gate.rate)


class Metrics:
    """The server's metric set in its own registry (so tests and several apps don't collide)."""

    def __init__(self, engine, backend: str):
        prometheus_client.disable_created_metrics()  # process-wide: no `_created` series anywhere
        self.registry = CollectorRegistry()
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(collector)
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
        self.phases = Histogram("grinfer_request_phase_seconds",
                                "Time per request phase (read, parse, user, features, retrieve, engine, respond, "
                                "encode, send) by endpoint", ["endpoint", "phase"], buckets=PHASE_BUCKETS,
                                registry=self.registry)
        self.engine = engine
        self.registry.register(EngineCollector(engine))
        self.dependencies: DependencyCollector | None = None

    def watch(self, service) -> None:
        """Export the service's store and cache health (once per Metrics; later calls change nothing)."""
        if self.dependencies is None:
            self.dependencies = DependencyCollector(service)
            self.registry.register(self.dependencies)

    @staticmethod
    def route_label(scope: MutableMapping[str, Any]) -> str:
        """The endpoint label of an HTTP request: its route's path template ("/v1/users/{user}", "/docs").

        Call it after the app has handled the request (the router has then put the route in the
        scope); routes that are not API routes (OpenAPI, Swagger, mounts) are matched here. A path
        that no route matches is "unmatched", so label values stay bounded.
        """
        route = scope.get("route")
        if route is not None:
            return route.path
        app = scope.get("app")
        for candidate in getattr(getattr(app, "router", None), "routes", ()):
            match, _ = candidate.matches(scope)
            if match is not Match.NONE:
                return candidate.path
        return UNMATCHED

    def on_step(self, step: dict) -> None:
        self.batch_tokens.observe(step["tokens"])
        self.batch_requests.observe(step["requests"])

    def observe(self, endpoint: str, seconds: float) -> None:
        self.latency.labels(endpoint, self.backend).observe(seconds)

    def observe_phases(self, endpoint: str, spans: list[tuple[str, float]]) -> None:
        for phase, seconds in spans:
            self.phases.labels(endpoint, phase).observe(seconds)

    def error(self, endpoint: str, kind: str) -> None:
        self.errors.labels(endpoint, kind).inc()

    def render(self) -> bytes:
        """The Prometheus text page; with front-end workers (multiprocess mode) every process's series summed."""
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        registry.register(EngineCollector(self.engine))
        if self.dependencies is not None:
            registry.register(self.dependencies)
        return generate_latest(registry)
