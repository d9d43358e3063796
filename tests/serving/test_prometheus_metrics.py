"""/metrics follows Prometheus conventions on a live server (counters end in _total, no _created series,
process_* and python_* collectors, bounded endpoint labels), and the shipped Grafana dashboard only
queries metric names that the server really exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from test_rest import Stack

from grinfer.config import EngineConfig, preset
from grinfer.engine import Engine
from grinfer.features.featurizer import UserContext
from grinfer.model import build_model
from grinfer.serving.app import AppState, create_app
from grinfer.serving.metrics import KV_COUNTERS, RETRIEVAL_COUNTERS, UNMATCHED, EngineCollector, Metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "grinfer.json"
METRIC_NAME = re.compile(r"\b((?:grinfer|process|python)_[A-Za-z0-9_]+)")


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A live server after some traffic: two ranks of one user (miss, hit), recommends, errors, docs.

    Its engine has no retrieval model (recommend retrieves over the catalogue), so no history cache."""
    stack = Stack(f"sqlite:///{tmp_path_factory.mktemp('metrics') / 'grinfer.db'}", "memory://")
    user = str(stack.ds.users[0].user_id)
    for _ in range(2):
        assert stack.http.post("/v1/rank", json={"user": user, "candidates": [{"item": stack.raw(1)}]}).is_success
    for _ in range(2):
        assert stack.http.post("/v1/recommend", json={"user": user, "k": 3}).is_success
    assert stack.http.get("/v1/users/bad%20id").status_code == 422
    assert stack.http.get("/docs").is_success and stack.http.get("/openapi.json").is_success
    yield stack, stack.http.get("/metrics").text
    stack.close()


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample_names(text: str) -> set[str]:
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def test_running_counts_are_counters_and_levels_are_gauges(live):
    _, text = live
    found = families(text)
    for name in KV_COUNTERS:
        family = found[f"grinfer_kv_cache_{name}"]
        assert family.type == "counter", name
        assert [s.name for s in family.samples] == [f"grinfer_kv_cache_{name}_total"]
    assert found["grinfer_kv_cache_hits"].samples[0].value >= 1  # the second rank of the user
    assert found["grinfer_kv_cache_misses"].samples[0].value >= 1
    assert not any(name.startswith("grinfer_retrieval_cache") for name in found)  # no retrieval model here
    for name in ("grinfer_queue_depth", "grinfer_running_requests", "grinfer_kv_cache_occupancy",
                 "grinfer_kv_cache_users", "grinfer_device_memory_bytes"):
        assert found[name].type == "gauge", name
    memory = found["grinfer_device_memory_bytes"].samples[0]
    assert memory.labels == {"device": "cpu"} and memory.value > 0


def test_no_created_series_and_standard_collectors(live):
    _, text = live
    names = sample_names(text)
    assert not [n for n in names if n.endswith("_created")]
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds",
                 "python_info", "python_gc_objects_collected_total"):
        assert name in names, name


def test_docs_and_openapi_are_labelled_by_their_route(live):
    stack, _ = live
    assert stack.http.get("/no/such/route").status_code == 404
    latency = families(stack.http.get("/metrics").text)["grinfer_request_seconds"].samples
    endpoints = {s.labels["endpoint"] for s in latency}
    assert {"/docs", "/openapi.json", "/v1/rank", "/v1/users/{user}", UNMATCHED} <= endpoints
    assert not [e for e in endpoints if "bad" in e or "no/such" in e]


def test_error_endpoints_are_route_templates(live):
    _, text = live
    errors = families(text)["grinfer_errors"].samples
    assert {"endpoint": "/v1/users/{user}", "kind": "validation"} in [s.labels for s in errors]  # the path pattern
    assert not [s for s in errors if "bad" in s.labels["endpoint"]]  # no raw paths as label values


@pytest.mark.parametrize(("path", "method", "label"), [
    ("/docs", "GET", "/docs"),
    ("/openapi.json", "GET", "/openapi.json"),
    ("/docs/oauth2-redirect", "GET", "/docs/oauth2-redirect"),
    ("/v1/users/someone", "GET", "/v1/users/{user}"),
    ("/v1/rank", "GET", "/v1/rank"),  # a wrong method still names the route (405)
    ("/no/such/route", "GET", UNMATCHED),
])
def test_route_label_names_every_route_and_only_routes(live, path, method, label):
    stack, _ = live
    app = create_app(AppState(stack.service, stack.metrics))
    scope = {"type": "http", "path": path, "method": method, "root_path": "", "headers": [], "app": app}
    assert Metrics.route_label(scope) == label


def test_the_grafana_dashboard_queries_only_exported_metrics(live):
    _, text = live
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in ("request rate", "p50", "p99", "queue depth", "batch size", "kv cache hit ratio", "device memory"):
        assert topic in titles, topic
    used = {name for expr in exprs for name in METRIC_NAME.findall(expr)}
    assert {"grinfer_request_seconds_bucket", "grinfer_kv_cache_hits_total", "grinfer_device_memory_bytes"} <= used
    missing = used - sample_names(text)
    assert not missing, f"the dashboard queries metrics the server does not export: {sorted(missing)}"


def test_the_retrieval_models_history_cache_is_exported(catalog, mtgr_cfg):
    """An engine with a retrieval model: one user's history retrieved twice is a miss, then a hit."""
    torch.manual_seed(0)
    retriever = build_model(preset("hstu-ml1m").with_vocab(num_items=catalog.num_items)
                            .replace(dropout=0.0, max_seq_len=16)).eval()
    engine = Engine(build_model(mtgr_cfg).eval(), catalog, EngineConfig(kv_cache_bytes=1 << 22),
                    retriever=retriever).start()
    try:
        rng = np.random.default_rng(0)
        stamps = (956_700_000 + np.cumsum(rng.integers(1, 4000, size=9))).astype(np.int64)
        items = rng.integers(1, catalog.num_items + 1, size=9).astype(np.int64)
        context = UserContext(np.zeros(4, np.int64), items, stamps, rng.integers(1, 6, size=9).astype(np.int64), 9)
        for _ in range(2):
            engine.submit_retrieval(context, 5, user="u1", version=0).result(timeout=60)
        found = {f.name: f for f in EngineCollector(engine).collect()}
    finally:
        engine.shutdown()
    for name in RETRIEVAL_COUNTERS:
        assert found[f"grinfer_retrieval_cache_{name}"].type == "counter", name
    assert found["grinfer_retrieval_cache_misses"].samples[0].value == 1
    assert found["grinfer_retrieval_cache_hits"].samples[0].value == 1
    assert found["grinfer_retrieval_cache_users"].samples[0].value == 1
    assert 0 < found["grinfer_retrieval_cache_occupancy"].samples[0].value <= 1
