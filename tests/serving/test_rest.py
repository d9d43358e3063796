"""REST end to end over real HTTP, on the embedded default (SQLite + in-process cache) and on
PostgreSQL + Redis: rank, recommend, events then rank, roll history, bad input, overload, metrics."""

from __future__ import annotations

import asyncio
import os
import time
import uuid

import httpx
import numpy as np
import pytest
import torch

from grinfer.config import EngineConfig, preset
from grinfer.data import generate_synthetic
from grinfer.engine import Engine
from grinfer.features import FeatureRequest, Featurizer
from grinfer.model import build_model
from grinfer.serving.app import AppState, create_app
from grinfer.serving.background import BackgroundServer
from grinfer.serving.metrics import Metrics
from grinfer.serving.service import RecommenderService
from grinfer.storage import open_cache, open_store
from grinfer.storage.importer import import_dataset

NUM_ITEMS = 60
API_KEY = "s3cret"
SERVICES = os.environ.get("GRINFER_SKIP_SERVICES") != "1"


class Stack:
    """A real server over a real store/cache, plus the model for reference computations."""

    def __init__(self, store_url: str, cache_url: str, engine_cfg: EngineConfig = EngineConfig()):
        torch.manual_seed(0)
        self.ds = generate_synthetic(num_users=12, num_items=NUM_ITEMS, mean_events=15, seed=0)
        cfg = preset("mtgr-tiny").with_vocab(num_items=NUM_ITEMS, num_year_buckets=19)
        self.model = build_model(cfg).eval()
        self.store, self.cache = open_store(store_url), open_cache(cache_url)
        import_dataset(self.ds, self.store)
        self.engine = Engine(self.model, self.ds.catalog, engine_cfg).start()
        self.service = RecommenderService(self.engine, self.ds.catalog, self.store, self.cache)
        self.metrics = Metrics(self.engine, "eager")
        self.engine.on_step = self.metrics.on_step
        self.server = BackgroundServer(create_app(AppState(self.service, self.metrics, api_key=API_KEY,
                                                           max_body_bytes=64 * 1024)))
        self.url = self.server.start()
        self.http = httpx.Client(base_url=self.url, timeout=30)
        self.featurizer = Featurizer(self.ds.catalog, cfg.num_time_buckets)

    def raw(self, dense: int) -> int:
        return int(self.ds.catalog.raw_ids[dense])

    def uncached(self, user: str, raw_items: list[int]) -> dict[int, float]:
        """Cold recomputation of the user's current context: item -> ctr probability."""
        record, _ = self.service.user_record(user)
        ctx = self.service.context(record)
        dense = self.service.to_dense(raw_items, "candidates")
        now = int(time.time())  # the service stamps requests with the wall clock; the gap buckets are log-wide
        with torch.no_grad():
            probs = torch.sigmoid(self.model(self.featurizer.rank_batch([FeatureRequest(ctx, dense, now)])))
        return {item: float(p) for item, p in zip(raw_items, probs[:, 0])}

    def close(self):
        self.http.close()
        self.server.stop()
        self.engine.shutdown()
        self.cache.close()
        self.store.close()


def _urls(kind: str, tmp_path) -> tuple[str, str]:
    if kind == "embedded":
        return f"sqlite:///{tmp_path / 'grinfer.db'}", "memory://"
    tag = "t" + uuid.uuid4().hex[:10]
    return (f"postgresql://postgres@127.0.0.1:5432/test?schema={tag}",
            f"redis://127.0.0.1:6379/0?prefix={tag}:")


@pytest.fixture(params=["embedded", pytest.param("postgres+redis", marks=pytest.mark.skipif(
    not SERVICES, reason="GRINFER_SKIP_SERVICES=1: PostgreSQL/Redis tests skipped on request"))])
def stack(request, tmp_path):
    s = Stack(*_urls(request.param, tmp_path))
    yield s
    s.close()


def _user(stack) -> str:
    return str(stack.ds.users[0].user_id)


def test_rank_returns_sorted_scores_for_catalogue_ids(stack):
    items = [stack.raw(i) for i in (1, 5, 9, 13)]
    r = stack.http.post("/v1/rank", json={"user": _user(stack), "candidates": [{"item": i} for i in items]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert sorted(x["item"] for x in body["items"]) == sorted(items)
    scores = [x["score"] for x in body["items"]]
    assert scores == sorted(scores, reverse=True)
    assert set(body["items"][0]["probabilities"]) == {"ctr", "ctcvr"}
    assert body["cold_start"] is False
    expected = stack.uncached(_user(stack), items)
    for x in body["items"]:
        assert x["probabilities"]["ctr"] == pytest.approx(expected[x["item"]], abs=1e-5)


def test_recommend_returns_k_unseen_items(stack):
    r = stack.http.post("/v1/recommend", json={"user": _user(stack), "k": 5})
    assert r.status_code == 200, r.text
    items = [x["item"] for x in r.json()["items"]]
    assert len(items) == 5 == len(set(items))
    seen = {stack.raw(i) for i in stack.ds.users[0].items}
    assert not seen & set(items)


def test_events_then_rank_uses_the_kv_cache_and_changes_scores(stack):
    user, items = _user(stack), [stack.raw(i) for i in (2, 3, 4)]
    payload = {"user": user, "candidates": [{"item": i} for i in items]}
    first = stack.http.post("/v1/rank", json=payload).json()
    last = int(stack.ds.users[0].timestamps[-1])
    events = [{"item": stack.raw(7), "action": 5, "ts": last + 60},
              {"item": stack.raw(8), "action": 1, "ts": last + 90}]
    r = stack.http.post("/v1/events", json={"user": user, "events": events}, headers={"X-API-Key": API_KEY})
    assert r.status_code == 200, r.text
    assert r.json()["appended"] == 2 and r.json()["realtime_events"] == 2
    second = stack.http.post("/v1/rank", json=payload).json()
    assert second["cache"] == "partial"
    before = {x["item"]: x["score"] for x in first["items"]}
    after = {x["item"]: x["score"] for x in second["items"]}
    assert any(abs(before[i] - after[i]) > 1e-6 for i in items)
    expected = stack.uncached(user, items)
    for x in second["items"]:
        assert x["probabilities"]["ctr"] == pytest.approx(expected[x["item"]], abs=1e-5)
    profile = stack.http.get(f"/v1/users/{user}").json()
    assert profile["realtime_events"] == 2 and profile["recent"][0]["item"] in (stack.raw(7), stack.raw(8))


def test_roll_history_invalidates_cache_and_matches_cold_recomputation(stack):
    user, items = _user(stack), [stack.raw(i) for i in (10, 11)]
    payload = {"user": user, "candidates": [{"item": i} for i in items]}
    last = int(stack.ds.users[0].timestamps[-1])
    stack.http.post("/v1/events", json={"user": user, "events": [{"item": stack.raw(7), "ts": last + 60}]},
                    headers={"X-API-Key": API_KEY})
    stack.http.post("/v1/rank", json=payload)
    version = stack.http.get(f"/v1/users/{user}").json()["history_version"]
    r = stack.http.post("/v1/admin/roll-history", json={"user": user}, headers={"X-API-Key": API_KEY})
    assert r.status_code == 200 and r.json()["history_version"] == version + 1
    after = stack.http.post("/v1/rank", json=payload).json()
    assert after["cache"] == "miss" and after["history_version"] == version + 1
    expected = stack.uncached(user, items)
    for x in after["items"]:
        assert x["probabilities"]["ctr"] == pytest.approx(expected[x["item"]], abs=1e-5)
    assert stack.http.get(f"/v1/users/{user}").json()["realtime_events"] == 0


def test_unknown_user_gets_a_cold_start_answer(stack):
    r = stack.http.post("/v1/rank", json={"user": "nobody-here", "candidates": [{"item": stack.raw(1)}]})
    assert r.status_code == 200 and r.json()["cold_start"] is True
    r = stack.http.post("/v1/recommend", json={"user": "nobody-here", "k": 3})
    assert r.status_code == 200 and len(r.json()["items"]) == 3
    assert stack.http.get("/v1/users/nobody-here").status_code == 404


@pytest.mark.parametrize("path, body, status, field", [
    ("/v1/rank", {"user": "1", "candidates": [{"item": 999_999}]}, 422, "candidates.0.item"),
    ("/v1/rank", {"user": "1", "candidates": []}, 422, "candidates"),
    ("/v1/rank", {"user": "1"}, 422, "candidates"),
    ("/v1/rank", {"user": "bad user", "candidates": [{"item": 1}]}, 422, "user"),
    ("/v1/rank", {"user": "1", "candidates": [{"item": -1}]}, 422, "candidates.0.item"),
    ("/v1/rank", {"user": "1", "candidates": [{"item": 1}], "extra": 1}, 422, "extra"),
    ("/v1/rank", {"user": "1", "candidates": [{"item": 1}], "events": [{"item": 1, "action": 9}]}, 422,
     "events.0.action"),
    ("/v1/recommend", {"user": "1", "k": 0}, 422, "k"),
    ("/v1/recommend", {"user": "1", "k": "many"}, 422, "k"),
    ("/v1/events", {"user": "1", "events": []}, 422, "events"),
    ("/v1/rank", {"user": "1", "candidates": [{"item": 1}, {"item": 2}, {"item": 1}]}, 422, "candidates.2.item"),
])
def test_bad_input_is_a_4xx_naming_the_field(stack, path, body, status, field):
    r = stack.http.post(path, json=body, headers={"X-API-Key": API_KEY})
    assert r.status_code == status, r.text
    assert r.json()["field"] == field, r.json()


def test_limits_auth_and_malformed_bodies(stack):
    big = b'{"user": "1", "candidates": [' + b", ".join([b'{"item": 1}'] * 7000) + b"]}"  # ~90 KB > 64 KB
    r = stack.http.post("/v1/rank", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["field"] == "body"
    r = stack.http.post("/v1/rank", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["field"] == "body"
    r = stack.http.get("/v1/users/not%20valid")
    assert r.status_code == 422 and r.json()["field"] == "user"
    r = stack.http.get("/no/such/route")
    assert r.status_code == 404 and "error" in r.json()
    r = stack.http.post("/v1/events", json={"user": "1", "events": [{"item": stack.raw(1)}]})
    assert r.status_code == 401 and r.json()["field"] == "x-api-key"
    r = stack.http.post("/v1/admin/roll-history", json={"user": "1"}, headers={"X-API-Key": "wrong"})
    assert r.status_code == 401
    r = stack.http.post("/v1/admin/roll-history", json={"user": "no-such-user"}, headers={"X-API-Key": API_KEY})
    assert r.status_code == 404 and r.json()["field"] == "user"


def test_health_readiness_metrics_and_openapi(stack):
    assert stack.http.get("/healthz").json() == {"status": "ok"}
    assert stack.http.get("/readyz").status_code == 200
    stack.http.post("/v1/rank", json={"user": _user(stack), "candidates": [{"item": stack.raw(1)}]})
    text = stack.http.get("/metrics").text
    for name in ("grinfer_request_seconds_bucket", "grinfer_queue_depth", "grinfer_kv_cache_misses",
                 "grinfer_kv_cache_occupancy", "grinfer_batch_tokens_bucket", "grinfer_rank_context_cache_total"):
        assert name in text, name
    assert 'endpoint="/v1/rank"' in text
    assert "/v1/rank" in stack.http.get("/openapi.json").json()["paths"]
    stack.engine.shutdown()
    assert stack.http.get("/readyz").status_code == 503
    r = stack.http.post("/v1/rank", json={"user": _user(stack), "candidates": [{"item": stack.raw(1)}]})
    assert r.status_code == 503


def test_overload_gives_429_with_retry_after_never_500(tmp_path):
    stack = Stack(f"sqlite:///{tmp_path / 'o.db'}", "memory://", EngineConfig(max_queue=1, max_batch_requests=1))
    try:
        items = [{"item": stack.raw(i)} for i in range(1, NUM_ITEMS + 1)]

        async def flood():
            async with httpx.AsyncClient(base_url=stack.url, timeout=60) as client:
                calls = [client.post("/v1/rank", json={"user": str(u.user_id), "candidates": items})
                         for u in stack.ds.users for _ in range(4)]
                return await asyncio.gather(*calls)

        responses = asyncio.run(flood())
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 429}, codes
        assert 429 in codes and 200 in codes
        assert all(r.headers["retry-after"] == "1" for r in responses if r.status_code == 429)
        assert all(len(r.json()["items"]) == NUM_ITEMS for r in responses if r.status_code == 200)
    finally:
        stack.close()


def test_concurrent_ranking_is_correct(stack):
    async def many():
        async with httpx.AsyncClient(base_url=stack.url, timeout=60) as client:
            calls = [client.post("/v1/rank", json={"user": str(u.user_id),
                                                   "candidates": [{"item": stack.raw(i)} for i in (1, 2, 3)]})
                     for u in stack.ds.users]
            return await asyncio.gather(*calls)

    for user, r in zip(stack.ds.users, asyncio.run(many())):
        assert r.status_code == 200
        expected = stack.uncached(str(user.user_id), [stack.raw(i) for i in (1, 2, 3)])
        got = {x["item"]: x["probabilities"]["ctr"] for x in r.json()["items"]}
        assert got == pytest.approx(expected, abs=1e-5)
        assert np.isfinite(list(got.values())).all()


def test_a_roll_with_nothing_to_fold_keeps_version_and_caches(stack):
    """On SQLite + memory and on PostgreSQL + Redis: an empty roll is a no-op end to end."""
    user, payload = _user(stack), {"user": _user(stack), "candidates": [{"item": stack.raw(4)}]}
    version = stack.http.post("/v1/rank", json=payload).json()["history_version"]
    assert stack.cache.get_user(user) is not None
    r = stack.http.post("/v1/admin/roll-history", json={"user": user}, headers={"X-API-Key": API_KEY})
    assert r.json() == {"user": user, "history_version": version, "folded": 0}
    assert stack.cache.get_user(user) is not None  # the cached record was not invalidated
    after = stack.http.post("/v1/rank", json=payload).json()
    assert (after["cache"], after["history_version"]) == ("hit", version)
