"""Idempotent appends: a retried write with the same key (Idempotency-Key header, idempotency_key
field, gRPC idempotency-key metadata or field) appends once and gets the first answer back, durably
(across a reopen, under concurrent retries), on SQLite and PostgreSQL (the shared test database,
one schema per test); keys are pruned past their retention window and beyond their bound."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import uuid

import grpc
import psycopg
import pytest
from psycopg import sql
from reliability_util import App

from grinfer.serving.grpc_server import start_grpc_server
from grinfer.serving.proto import grinfer_pb2 as pb
from grinfer.serving.proto import grinfer_pb2_grpc as pb_grpc
from grinfer.storage import open_store
from grinfer.storage import sqlite as sqlite_store
from grinfer.storage._common import KeyRetention
from grinfer.storage.base import Appended, Event, IdempotencyConflict

POSTGRES_URL = os.environ.get("GRINFER_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
SKIP_SERVICES = os.environ.get("GRINFER_SKIP_SERVICES") == "1"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.skipif(
    SKIP_SERVICES, reason="GRINFER_SKIP_SERVICES=1: PostgreSQL tests skipped on request"))])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    schema = f"t_{uuid.uuid4().hex[:20]}"
    yield f"{POSTGRES_URL}?schema={schema}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


EVENTS = [Event(1, 10, 4), Event(2, 11, 5)]


def test_retry_with_a_key_appends_once_and_gets_the_first_answer(store_url):
    with open_store(store_url) as store:
        assert store.append_events_once("u", EVENTS, "k1", "d1") == Appended(2, 2)
        store.append_events("u", [Event(3, 12, 4)])  # R grows: the replay still answers as the first time
        assert store.append_events_once("u", EVENTS, "k1", "d1") == Appended(2, 2, replayed=True)
        assert store.append_events_once("v", EVENTS, "k1", "d1") == Appended(2, 2)  # keys are per user
        with pytest.raises(IdempotencyConflict, match="k1"):
            store.append_events_once("u", EVENTS[:1], "k1", "other batch")
    with open_store(store_url) as store:  # durable: a retry after a restart is still recognised
        assert store.append_events_once("u", EVENTS, "k1", "d1").replayed
        assert store.append_events_once("u", EVENTS, "k2", "d1") == Appended(2, 5)
        assert len(store.get_user("u").realtime) == 5 and len(store.get_user("v").realtime) == 2


def test_concurrent_retries_append_once(store_url):
    with open_store(store_url) as store:
        store.append_events("u", [Event(9, 1, 3)])  # the user exists: retries race on its row, not its creation
        barrier, answers = threading.Barrier(4), []

        def retry():
            barrier.wait()
            answers.append(store.append_events_once("u", EVENTS, "same", "d"))
        threads = [threading.Thread(target=retry) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(a.replayed for a in answers) == [False, True, True, True]
        assert {(a.appended, a.realtime_events) for a in answers} == {(2, 3)}
        assert len(store.get_user("u").realtime) == 3


def test_version_1_sqlite_store_is_migrated_keeping_its_data(tmp_path):
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as old:  # the version-1 schema and data, as an older grinfer left them
        old.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)")
        for statement in sqlite_store.MIGRATIONS[0][1]:
            old.execute(statement)
        old.execute("INSERT INTO schema_version VALUES (1, 0)")
        old.execute("INSERT INTO users (id, profile) VALUES ('u', '[]')")
        old.executemany("INSERT INTO events (uid, item, ts, action) VALUES (1, ?, ?, ?)",
                        [(e.item, e.ts, e.action) for e in EVENTS])
    with open_store(f"sqlite:///{path}") as store:
        assert store.schema_version() == sqlite_store.SCHEMA_VERSION and store.get_user("u").realtime == EVENTS
        assert store.append_events_once("u", EVENTS, "k", "d") == Appended(2, 4)


def _keyed(store, key: str) -> Appended:
    return store.append_events_once("u", EVENTS[:1], key, "d")


def test_idempotency_keys_are_pruned_past_the_window_and_the_bound(store_url):
    with open_store(store_url) as store:
        store.key_pruning.retention = KeyRetention(window_s=100, max_keys=3, interval_s=0)  # prune after each
        for i in range(5):
            assert not _keyed(store, f"k{i}").replayed
        assert _keyed(store, "k4").replayed and _keyed(store, "k2").replayed  # the newest three are kept
        assert not _keyed(store, "k0").replayed  # pruned (beyond the bound): a retry is a new write
        assert store.prune_idempotency_keys(now=time.time() + 10) == 0  # all within the window
        assert store.prune_idempotency_keys(now=time.time() + 101) == 3  # all past it
        assert not _keyed(store, "k4").replayed
        assert len(store.get_user("u").realtime) == 7


def test_pruning_waits_for_its_interval(store_url):
    with open_store(store_url) as store:
        store.key_pruning.retention = KeyRetention(window_s=100, max_keys=1, interval_s=3600)
        for i in range(3):  # the first append prunes (nothing yet), the next ones are inside the interval
            _keyed(store, f"k{i}")
        assert _keyed(store, "k0").replayed
        assert store.prune_idempotency_keys() == 2  # called directly: down to the bound
        assert not _keyed(store, "k0").replayed


@pytest.fixture
def app(store_url):
    served = App(store_url, "memory://")
    yield served
    served.close()


def test_rest_retry_with_idempotency_key_appends_once(app):
    user = app.users[0]
    before = len(app.store.get_user(user).realtime)
    first = app.append(user, key="batch-1")
    assert first.status_code == 200, first.text
    assert app.append(user, key="batch-1").json() == first.json()
    assert len(app.store.get_user(user).realtime) == before + 1
    body = {"user": user, "events": [{"item": app.item(4), "ts": 1_000}], "idempotency_key": "batch-2"}
    assert app.http.post("/v1/events", json=body).json()["realtime_events"] == before + 2
    assert app.http.post("/v1/events", json=body).json()["realtime_events"] == before + 2
    assert len(app.store.get_user(user).realtime) == before + 2

    other = {**body, "events": [{"item": app.item(5), "ts": 1_000}]}
    conflict = app.http.post("/v1/events", json=other)
    assert conflict.status_code == 422 and conflict.json()["field"] == "idempotency_key"
    mismatch = app.http.post("/v1/events", json=body, headers={"Idempotency-Key": "batch-3"})
    assert mismatch.status_code == 422 and mismatch.json()["field"] == "idempotency_key"
    assert app.append(user, key="has space").status_code == 422
    assert len(app.store.get_user(user).realtime) == before + 2


def test_grpc_retry_with_idempotency_key_appends_once(app):
    server = start_grpc_server(app.service, app.metrics, "127.0.0.1", 0)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        stub, user = pb_grpc.RecommenderStub(channel), app.users[1]
        before = len(app.store.get_user(user).realtime)
        request = pb.AppendEventsRequest(user=user, events=[pb.Event(item=app.item(4), ts=1_000)])
        by_metadata = [stub.AppendEvents(request, metadata=(("idempotency-key", "g-1"),), timeout=30) for _ in "ab"]
        assert by_metadata[0] == by_metadata[1] and by_metadata[0].realtime_events == before + 1
        request.idempotency_key = "g-2"
        by_field = [stub.AppendEvents(request, timeout=30) for _ in "ab"]
        assert by_field[0] == by_field[1] and by_field[0].realtime_events == before + 2
        with pytest.raises(grpc.RpcError) as bad:
            stub.AppendEvents(request, metadata=(("idempotency-key", "g 3"),), timeout=30)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert len(app.store.get_user(user).realtime) == before + 2
    finally:
        channel.close()
        server.stop(grace=1).wait(5)
