"""Redis killed or hung (SIGSTOP) under concurrent rank / recommend / event calls: every request is
served from the store uncached, the metrics, one log line and /readyz say the cache is degraded, and
the server uses Redis again once it is back, with no record made stale during the outage served. A
server started while Redis is down starts, serves uncached, says so, and uses Redis once it is up."""

from __future__ import annotations

import logging
import os

import httpx
import pytest
import redis
from reliability_util import App, PrivateRedis, wait_until

from grinfer.bench.served import ServedProcess


@pytest.fixture
def redis_server():
    server = PrivateRedis()
    yield server
    server.close()


@pytest.fixture
def app(redis_server, tmp_path):
    served = App(f"sqlite:///{tmp_path / 'store.db'}", redis_server.url)
    yield served
    served.close()


def _cache_degraded(app: App) -> bool:
    ready = app.http.get("/readyz")
    assert ready.status_code == 200, ready.text  # a cache outage never makes the server unready
    return ready.json()["cache"]["degraded"]


@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_redis_outage_serves_uncached_then_recovers(app, redis_server, fault, caplog):
    assert {r.status_code for r in app.mixed_load(rounds=1)} == {200}
    assert {app.rank(user).status_code for user in app.users} == {200}  # every user's record is now in Redis
    assert app.metric("grinfer_cache_degraded") == 0 and not _cache_degraded(app)

    redis_server.kill() if fault == "killed" else redis_server.pause()
    with caplog.at_level(logging.WARNING, logger="grinfer.storage"):
        responses = app.mixed_load()
    failed = [(r.request.url.path, r.status_code, r.text) for r in responses if r.status_code != 200]
    assert failed == [] and len(responses) == 36
    assert app.metric("grinfer_cache_degraded") == 1 and app.metric("grinfer_cache_errors_total") >= 1
    assert _cache_degraded(app) and app.http.get("/readyz").json()["cache"]["last_error"]
    lines = [r.getMessage() for r in caplog.records if r.name == "grinfer.storage"]
    assert len(lines) == 1 and "degraded" in lines[0], lines  # one line for the outage, not one per request

    redis_server.start() if fault == "killed" else redis_server.resume()
    round_trips = app.cache.stats()["round_trips"]
    wait_until(lambda: app.rank(app.users[0]).status_code == 200 and not _cache_degraded(app), 30, "cache recovery")
    assert app.cache.stats()["round_trips"] > round_trips and app.metric("grinfer_cache_degraded") == 0
    for user in app.users:  # events appended during the outage are seen: their invalidations were replayed
        assert len(app.service.user_record(user)[0].realtime) == len(app.store.get_user(user).realtime)


def test_a_server_started_while_redis_is_down_serves_uncached_then_uses_redis(served_checkpoint, tmp_path):
    redis_server = PrivateRedis()
    redis_server.kill()  # its port is known and nothing listens on it
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRINFER_")}
    env.update(GRINFER_HOME=str(tmp_path / "home"), GRINFER_LOG_LEVEL="info")
    server = ServedProcess(["--backend", "eager", "--model", str(served_checkpoint), "--device", "cpu",
                            "--store", f"sqlite:///{tmp_path / 'store.db'}", "--cache", redis_server.url],
                           tmp_path / "server.log", env=env)
    try:
        server.wait_ready(180)  # started: Redis is a cache, not a dependency
        ready = httpx.get(f"{server.url}/readyz", timeout=10).json()
        assert ready["cache"]["degraded"] and ready["cache"]["last_error"]
        users = httpx.get(f"{server.url}/v1/users", params={"limit": 3}, timeout=10).json()["users"]
        for user in users:
            answer = httpx.post(f"{server.url}/v1/recommend", json={"user": user, "k": 3}, timeout=60)
            assert answer.status_code == 200, answer.text
        assert "degraded" in server.log_tail()

        redis_server.start()  # the same port
        wait_until(lambda: not httpx.get(f"{server.url}/readyz", timeout=10).json()["cache"]["degraded"], 30,
                   "the server to use Redis")
        for user in users:
            assert httpx.post(f"{server.url}/v1/recommend", json={"user": user, "k": 3}, timeout=60).status_code == 200
        assert redis.Redis(port=redis_server.port).keys("grinfer:u:*")  # user records cached in Redis now
    finally:
        server.stop()
        redis_server.close()
