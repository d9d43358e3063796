"""PostgreSQL stopped or hung (SIGSTOP) under concurrent requests (a private cluster, never the shared
one): reads the cache can answer are served, everything else answers a JSON 503 with Retry-After at
once (no 30 s pool wait, no call waiting on a silent server), /readyz answers 503 with the reason at
once, and the server recovers when it is back.

The time bounds are loose (5 s, against the 30 s of an unbounded pool wait) so a busy CI machine
cannot fail them; the measured figures are in BENCHMARKS.md's reliability section."""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from reliability_util import App, PrivatePostgres, wait_until

from grinfer.storage.deadline import Watchdog
from grinfer.storage.postgres import PostgresStore

FAST_S = 5.0


@pytest.fixture
def postgres():
    cluster = PrivatePostgres()
    yield cluster
    cluster.close()


def _timed(call):
    start = time.monotonic()
    response = call()
    return response, time.monotonic() - start


def test_postgres_down_fails_fast_serves_cached_reads_and_recovers(postgres):
    app = App(postgres.url, "memory://")
    try:
        cached, uncached = app.users[:4], app.users[4:8]
        assert {app.rank(user).status_code for user in cached} == {200}  # their records are now in the cache
        postgres.stop()

        calls = [lambda u=u: app.rank(u) for u in cached + uncached] + [lambda u=u: app.append(u) for u in cached]
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(_timed, calls * 2))
        by_call = list(zip(calls * 2, results))
        served = [r for (_, (r, _)) in by_call if r.status_code == 200]
        refused = [(r, t) for (_, (r, t)) in by_call if r.status_code != 200]
        assert len(served) == 2 * len(cached)  # every cached user's rank, and only those
        assert {r.request.url.path for r in served} == {"/v1/rank"}
        for response, seconds in refused:
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"] == "1" and "PostgreSQL" in response.json()["error"]
            assert seconds < FAST_S
        ready, seconds = _timed(lambda: app.http.get("/readyz"))
        assert ready.status_code == 503 and "store unavailable" in ready.json()["error"] and seconds < FAST_S
        assert app.metric("grinfer_store_degraded") == 1 and app.metric("grinfer_store_errors_total") >= 1

        postgres.start()
        wait_until(lambda: app.http.get("/readyz").status_code == 200, 60, "the store to be used again")
        assert app.rank(uncached[0]).status_code == 200 and app.append(cached[0]).status_code == 200
        assert app.metric("grinfer_store_degraded") == 0
    finally:
        app.close()


def test_postgres_hung_fails_fast_and_readyz_answers(postgres):
    app = App(postgres.url, "memory://")
    try:
        cached, uncached = app.users[:2], app.users[2:6]
        assert {app.rank(user).status_code for user in cached} == {200}
        postgres.pause()  # SIGSTOP: the connections stay open and nothing answers

        calls = [lambda u=u: app.rank(u) for u in cached + uncached] + [lambda u=u: app.append(u) for u in uncached]
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(_timed, calls))
        assert [r.status_code for r, _ in results[:len(cached)]] == [200] * len(cached)  # from the cache
        for response, seconds in results[len(cached):]:
            assert response.status_code == 503 and response.headers["retry-after"] == "1", response.text
            assert seconds < FAST_S
        ready, seconds = _timed(lambda: app.http.get("/readyz"))
        assert ready.status_code == 503 and "store unavailable" in ready.json()["error"] and seconds < FAST_S

        postgres.resume()
        wait_until(lambda: app.http.get("/readyz").status_code == 200, 60, "the store to answer again")
        assert app.rank(uncached[0]).status_code == 200 and app.append(uncached[0]).status_code == 200
    finally:
        postgres.resume()
        app.close()


def test_the_watchdog_shuts_down_a_call_past_its_deadline_only():
    watchdog = Watchdog("test")
    ours, server = socket.socketpair()
    with ours, server:
        with watchdog.guard(ours.fileno(), 0.2):
            assert ours.recv(1) == b""  # blocked on a silent peer until the watchdog shut the socket down
        assert watchdog.expired == 1
    ours, server = socket.socketpair()
    with ours, server:
        with watchdog.guard(ours.fileno(), 0.2):
            server.sendall(b"x")
            assert ours.recv(1) == b"x"
        time.sleep(0.4)  # past the deadline, but the call ended in time: the socket is left alone
        server.sendall(b"y")
        assert ours.recv(1) == b"y" and watchdog.expired == 1


def test_timeouts_come_from_the_store_url(postgres):
    with PostgresStore(f"{postgres.url}?statement_timeout_ms=250&pool_timeout_ms=300&call_timeout_ms=700") as store:
        with store._conn() as conn:
            assert conn.execute("SHOW statement_timeout").fetchone()[0] == "250ms"
        assert store._pool_timeout_s == 0.3 and store._call_timeout_s == 0.7
    for bad in ("pool_timeout_ms=0", "statement_timeout_ms=-1", "pool_timeout_ms=soon", "call_timeout_ms=-1"):
        with pytest.raises(ValueError, match=bad.split("=")[0]):
            PostgresStore(f"{postgres.url}?{bad}")
