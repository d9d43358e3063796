"""The closed-loop load generator (`grinfer bench --server`) against an in-process server: counts,
status classes, latency summaries and KV-cache deltas are consistent; only loopback is allowed.
No timing assertions: timings belong to the benchmark, not to pass/fail tests."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import torch
from typer.testing import CliRunner

from grinfer.bench.load import loopback_url, parse_clients, parse_kv_metrics, prepare, run_level_spread, run_load
from grinfer.cli import app as cli_app
from grinfer.config import EngineConfig, preset
from grinfer.data import generate_synthetic
from grinfer.engine import Engine
from grinfer.model import build_model
from grinfer.serving.app import AppState, create_app
from grinfer.serving.background import BackgroundServer
from grinfer.serving.metrics import Metrics
from grinfer.serving.service import RecommenderService
from grinfer.storage import open_cache, open_store
from grinfer.storage.importer import import_dataset

NUM_ITEMS = 60


class Server:
    """A real HTTP server over SQLite + the in-process cache with a random mtgr-tiny model."""

    def __init__(self, path, engine_cfg: EngineConfig = EngineConfig()):
        torch.manual_seed(0)
        ds = generate_synthetic(num_users=12, num_items=NUM_ITEMS, mean_events=15, seed=0)
        model = build_model(preset("mtgr-tiny").with_vocab(num_items=NUM_ITEMS, num_year_buckets=19)).eval()
        self.store, self.cache = open_store(f"sqlite:///{path}"), open_cache("memory://")
        import_dataset(ds, self.store)
        self.engine = Engine(model, ds.catalog, engine_cfg).start()
        metrics = Metrics(self.engine, "eager")
        self.engine.on_step = metrics.on_step
        service = RecommenderService(self.engine, ds.catalog, self.store, self.cache)
        self.http = BackgroundServer(create_app(AppState(service, metrics)))
        self.url = self.http.start()

    def close(self) -> None:
        self.http.stop()
        self.engine.shutdown()
        self.cache.close()
        self.store.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("load") / "grinfer.db")
    yield s
    s.close()


def _check(results, levels, per_level):
    assert [r.clients for r in results] == levels
    for r in results:
        assert r.requests == per_level
        assert r.ok + r.rejected_429 + sum(r.errors.values()) == r.requests
        assert not any(k.startswith("5") for k in r.errors), r.errors
        assert len(r.latencies_ms) == r.ok and all(x > 0 for x in r.latencies_ms)
        assert r.latencies_ms == sorted(r.latencies_ms)
        if r.ok:
            assert 0 < r.p50_ms <= r.p90_ms <= r.p99_ms <= r.latencies_ms[-1]
        assert r.seconds > 0 and r.requests_per_s >= r.ok_per_s >= 0
        assert r.kv_delta is not None and all(v >= 0 for v in r.kv_delta.values())
        assert r.kv_hit_ratio is None or 0 <= r.kv_hit_ratio <= 1


@pytest.mark.parametrize("endpoint", ["recommend", "rank"])
def test_levels_count_every_request_and_summarise_latency(server, endpoint):
    results = run_load(server.url, [1, 4], endpoint=endpoint, requests=25, duration_s=120, candidates=10)
    _check(results, [1, 4], 25)
    for r in results:
        assert r.ok == 25 and r.rejected_429 == 0 and r.errors == {}
        assert r.candidates == (10 if endpoint == "rank" else None)
    # 12 users, 25 requests a level: the second level finds most contexts computed already
    assert results[1].kv_hit_ratio is not None and results[1].kv_hit_ratio > 0


def test_duration_bounds_a_level(server):
    (r,) = run_load(server.url, [2], requests=100_000, duration_s=0.5)
    assert 0 < r.requests < 100_000
    assert r.ok + r.rejected_429 + sum(r.errors.values()) == r.requests


def test_overload_is_counted_as_429_not_as_an_error(tmp_path):
    s = Server(tmp_path / "o.db", EngineConfig(max_queue=1, max_batch_requests=1))
    try:
        results = run_load(s.url, [16], endpoint="rank", requests=48, candidates=NUM_ITEMS)
    finally:
        s.close()
    _check(results, [16], 48)
    assert results[0].errors == {}  # 200s and 429s only


@pytest.mark.parametrize("url", ["http://example.com:8000", "http://10.0.0.1:8000", "http://192.0.2.1",
                                 "https://8.8.8.8/", "http://127.0.0.1.nip.io:8000", "http://0.0.0.0:8000",
                                 "ftp://127.0.0.1", "127.0.0.1:8000", "http://[2001:db8::1]:80"])
def test_non_loopback_servers_are_refused_before_any_request(url):
    with pytest.raises(ValueError, match=r"loopback|http://"):
        run_load(url, [1], requests=1, duration_s=1)


def test_loopback_urls_are_accepted():
    assert loopback_url("http://localhost:8000/") == "http://localhost:8000"
    assert loopback_url("http://127.0.0.2:9") == "http://127.0.0.2:9"
    assert loopback_url("http://[::1]:80") == "http://[::1]:80"


def test_cli_refuses_other_hosts_and_bad_levels():
    runner = CliRunner()
    r = runner.invoke(cli_app, ["bench", "--server", "http://example.com:8000"])
    assert r.exit_code == 2 and "loopback" in r.output
    r = runner.invoke(cli_app, ["bench", "--server", "http://127.0.0.1:1", "--clients", "0"])
    assert r.exit_code == 2 and "--clients" in r.output
    assert parse_clients(["1,8", "32"]) == [1, 8, 32]
    with pytest.raises(ValueError):
        parse_clients(["x"])


def test_cli_prints_a_table_and_writes_json(server, tmp_path):
    out = tmp_path / "load.json"
    r = CliRunner().invoke(cli_app, ["bench", "--server", server.url, "--clients", "1,2", "--endpoint", "rank",
                                     "--candidates", "5", "--requests", "6", "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "p99 ms" in r.output and "5 candidates" in r.output
    data = json.loads(out.read_text())
    assert [lv["clients"] for lv in data["levels"]] == [1, 2]
    assert all(lv["requests"] == 6 and "latencies_ms" not in lv for lv in data["levels"])
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the PNG --help promises


def test_parse_kv_metrics():
    text = ("# HELP grinfer_kv_cache_hits_total KV cache hits\n# TYPE grinfer_kv_cache_hits_total counter\n"
            "grinfer_kv_cache_hits_total 3.0\ngrinfer_kv_cache_partial_hits_total 1.0\n"
            "grinfer_kv_cache_misses_total 2.0\ngrinfer_kv_cache_host_hits_total 7.0\ngrinfer_kv_cache_users 4.0\n")
    assert parse_kv_metrics(text) == {"hits": 3.0, "partial_hits": 1.0, "misses": 2.0}


def test_a_level_spread_over_client_processes_counts_every_request(server):
    """The same level from 2 client processes: every request counted once, the server saw them all."""
    async def workload():
        async with httpx.AsyncClient(base_url=server.url) as client:
            return await prepare(client, "rank", 10, 10, seed=1)

    wl = asyncio.run(workload())
    def served():
        return server.engine.stats()["kv_cache"]

    before = served()
    result = run_level_spread(server.url, wl, clients=4, requests=30, duration_s=60, processes=2)
    _check([result], [4], 30)
    after = served()
    lookups = sum(after[k] - before[k] for k in ("hits", "partial_hits", "misses"))
    assert result.ok == 30 and lookups == 30
