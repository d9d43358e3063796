"""UserStore + Catalog: one suite run against SQLite (a temp file) and PostgreSQL (a temp schema)."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from grinfer.data import generate_synthetic
from grinfer.data.types import ItemCatalog
from grinfer.storage import open_store
from grinfer.storage.base import Event, Roll, UserRecord
from grinfer.storage.sqlite import SCHEMA_VERSION  # PostgreSQL's migrations are numbered alike


def ev(item: int, ts: int, action: int = 3) -> Event:
    return Event(item=item, ts=ts, action=action)


def test_migrations_applied_and_reopen_keeps_data(store_url):
    with open_store(store_url) as s:
        assert s.schema_version() == SCHEMA_VERSION
        s.append_events("u", [ev(1, 10)])
    with open_store(store_url) as s:  # migrations are idempotent
        assert s.schema_version() == SCHEMA_VERSION
        assert s.get_user("u").realtime == [ev(1, 10)]


def test_concurrent_open_migrates_once(store_url):
    barrier = threading.Barrier(4)
    stores, errors = [], []

    def opener():
        barrier.wait()
        try:
            stores.append(open_store(store_url))
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=opener) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [s.schema_version() for s in stores] == [SCHEMA_VERSION] * 4
    stores[0].put_profile("a", [1])
    assert stores[3].get_user("a").profile == [1]
    for s in stores:
        s.close()


def test_unknown_user_is_none(store):
    assert store.get_user("nobody") is None


def test_profile_put_get(store):
    store.put_profile("alice", [1, 2, 3, 4])
    assert store.get_user("alice") == UserRecord(user="alice", profile=[1, 2, 3, 4])
    store.put_profile("alice", [2, 0, 5, 9])  # replaces, keeps everything else
    store.append_events("alice", [ev(5, 100)])
    store.put_profile("alice", [0, 0, 0, 1])
    got = store.get_user("alice")
    assert got.profile == [0, 0, 0, 1]
    assert got.realtime == [ev(5, 100)]


def test_append_creates_user_with_unknown_profile(store):
    assert store.append_events("bob", [ev(7, 1)]) == 1
    assert store.get_user("bob") == UserRecord(user="bob", profile=[], history_version=0, realtime=[ev(7, 1)])
    assert store.append_events("carol", []) == 0
    assert store.get_user("carol") == UserRecord(user="carol", profile=[])


def test_append_orders_by_time_with_ties_in_append_order(store):
    assert store.append_events("u", [ev(1, 50), ev(2, 10), ev(3, 50, 5), ev(4, 30)]) == 4
    assert store.append_events("u", [ev(5, 10, 1), ev(6, 60), ev(7, 50, 2)]) == 7
    got = store.get_user("u")
    assert got.static == []
    # time order; equal timestamps keep the order in which they were appended
    assert got.realtime == [ev(2, 10), ev(5, 10, 1), ev(4, 30), ev(1, 50), ev(3, 50, 5), ev(7, 50, 2), ev(6, 60)]
    assert [e.item for e in store.get_user("u").realtime] == [2, 5, 4, 1, 3, 7, 6]  # stable across reads


def test_roll_moves_r_into_s_and_bumps_version(store):
    store.put_profile("u", [1, 1, 1, 1])
    store.append_events("u", [ev(1, 100), ev(2, 200)])
    assert store.roll_history("u") == Roll(1, 2)
    got = store.get_user("u")
    assert (got.history_version, got.static, got.realtime) == (1, [ev(1, 100), ev(2, 200)], [])
    assert store.append_events("u", [ev(3, 150), ev(4, 300)]) == 2  # R length only
    got = store.get_user("u")
    assert got.static == [ev(1, 100), ev(2, 200)]
    assert got.realtime == [ev(3, 150), ev(4, 300)]
    assert store.roll_history("u") == Roll(2, 2)
    got = store.get_user("u")
    assert got.static == [ev(1, 100), ev(3, 150), ev(2, 200), ev(4, 300)]
    assert (got.history_version, got.realtime, got.profile) == (2, [], [1, 1, 1, 1])


def test_a_roll_with_nothing_to_fold_changes_nothing(store):
    store.put_profile("fresh", [2])
    assert store.roll_history("fresh") == Roll(0, 0)  # a user without events keeps version 0
    store.append_events("u", [ev(1, 100)])
    assert store.roll_history("u") == Roll(1, 1)
    before = store.get_user("u")
    assert store.roll_history("u") == Roll(1, 0)
    assert store.roll_history("u") == Roll(1, 0)
    assert store.get_user("u") == before
    store.append_events("u", [ev(2, 50)])  # an event older than S's newest still counts as R
    assert store.roll_history("u") == Roll(2, 1)
    assert store.get_user("u").static == [ev(2, 50), ev(1, 100)]


def test_roll_unknown_user_raises_keyerror(store):
    with pytest.raises(KeyError):
        store.roll_history("ghost")
    assert store.get_user("ghost") is None


def test_count_and_list_users(store):
    assert store.count_users() == 0
    assert store.list_users() == []
    names = [f"user-{i}" for i in range(12)]
    for i, name in enumerate(names):
        if i % 2:
            store.put_profile(name, [i])
        else:
            store.append_events(name, [ev(i, i)])
    store.put_profile("user-0", [9])  # an update does not add a user
    assert store.count_users() == 12
    assert store.list_users() == names  # creation order
    assert store.list_users(limit=5) == names[:5]
    assert store.list_users(limit=5, offset=10) == names[10:]
    assert store.list_users(limit=0) == []
    with pytest.raises(ValueError):
        store.list_users(limit=-1)


def assert_catalog_equal(got: ItemCatalog, want: ItemCatalog) -> None:
    np.testing.assert_array_equal(got.genres, want.genres)
    np.testing.assert_array_equal(got.year_bucket, want.year_bucket)
    np.testing.assert_array_equal(got.raw_ids, want.raw_ids)
    assert got.genres.dtype == np.uint8
    assert got.year_bucket.dtype == got.raw_ids.dtype == np.int64
    assert got.titles == want.titles
    assert got.genre_names == want.genre_names


def test_catalog_round_trip(store):
    assert store.load_catalog() is None
    catalog = generate_synthetic(num_users=5, num_items=300, mean_events=5, seed=1).catalog
    store.put_catalog(catalog)
    assert_catalog_equal(store.load_catalog(), catalog)

    # put replaces; titles that need escaping survive
    titles = ["", "Tab\there", "New\nline", "Back\\slash \\N", "Ünïcödé 🎬 'quote' \"dq\"", "x" * 500]
    small = ItemCatalog(
        genres=np.array([[0, 0, 0], [1, 0, 1], [0, 1, 0], [1, 1, 1], [0, 0, 1], [1, 0, 0]], np.uint8),
        year_bucket=np.array([0, 1, 2, 3, 4, 5], np.int64),
        titles=titles,
        genre_names=["A|b", "c\td", "e"],
        raw_ids=np.array([0, 10, 2**40, 3, 4, 5], np.int64),
    )
    store.put_catalog(small)
    assert_catalog_equal(store.load_catalog(), small)


def test_catalog_shape_mismatch_is_rejected(store):
    bad = ItemCatalog(
        genres=np.zeros((3, 2), np.uint8),
        year_bucket=np.zeros(3, np.int64),
        titles=["", "a", "b"],
        genre_names=["only one"],
        raw_ids=np.zeros(3, np.int64),
    )
    with pytest.raises(ValueError, match="genres"):
        store.put_catalog(bad)
    assert store.load_catalog() is None


def test_model_registry(store):
    assert store.list_models() == []
    store.register_model("mtgr-small@1", "/ckpt/1", {"preset": "mtgr-small", "auc": 0.71, "tags": ["a", "b"]})
    store.register_model("hstu-ml1m@1", "/ckpt/h", {})
    store.register_model("mtgr-small@1", "/ckpt/1b", {"auc": 0.72})  # same name: replaced in place
    models = store.list_models()
    assert [(m["name"], m["path"], m["metadata"]) for m in models] == [
        ("mtgr-small@1", "/ckpt/1b", {"auc": 0.72}),
        ("hstu-ml1m@1", "/ckpt/h", {}),
    ]
    assert all(abs(m["registered_at"] - time.time()) < 600 for m in models)
    with pytest.raises(ValueError, match="JSON"):
        store.register_model("bad", "/x", {"obj": object()})


def test_concurrent_appends_lose_nothing(store):
    threads_n, appends_n = 8, 25
    shared_lengths: list[int] = []
    errors: list[Exception] = []
    barrier = threading.Barrier(threads_n)

    def worker(t: int) -> None:
        try:
            barrier.wait()
            for i in range(appends_n):
                shared_lengths.append(store.append_events("shared", [ev(t, i), ev(t, i, 4)]))
                store.append_events(f"own-{t}", [ev(i, 1000 - i)])
                store.get_user("shared")
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    total = threads_n * appends_n * 2
    # appends to one user are serialised: each saw a distinct R length, and none was lost
    assert sorted(shared_lengths) == list(range(2, total + 1, 2))
    shared = store.get_user("shared").realtime
    assert len(shared) == total
    assert sorted((e.item, e.ts, e.action) for e in shared) == sorted(
        (t, i, a) for t in range(threads_n) for i in range(appends_n) for a in (3, 4)
    )
    for t in range(threads_n):
        assert [e.item for e in store.get_user(f"own-{t}").realtime] == list(range(appends_n))[::-1]
    assert store.count_users() == threads_n + 1


def test_rolls_during_appends_lose_nothing(store):
    store.put_profile("u", [])
    stop = threading.Event()
    rolls: list[int] = []

    def roller() -> None:
        while not stop.is_set():
            rolls.append(store.roll_history("u"))

    t = threading.Thread(target=roller)
    t.start()
    try:
        for i in range(60):
            store.append_events("u", [ev(i, i)])
    finally:
        stop.set()
        t.join()
    got = store.get_user("u")
    bumps = [r for r in rolls if r.folded]
    assert [r.history_version for r in bumps] == list(range(1, len(bumps) + 1))  # each fold bumps once
    versions = [r.history_version for r in rolls]
    assert versions == sorted(versions)  # an empty roll returns the version it found
    assert got.history_version == len(bumps) and sum(r.folded for r in bumps) == len(got.static)
    assert got.static + got.realtime == [ev(i, i) for i in range(60)]


def test_closed_store_raises(store_url):
    s = open_store(store_url)
    s.close()
    s.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        s.get_user("u")


_CHILD = """
import sys
from grinfer.storage import open_store
from grinfer.storage.base import Event
store = open_store(sys.argv[1])
i = 0
while True:
    store.append_events("durable", [Event(item=i, ts=2 * i, action=1), Event(item=i, ts=2 * i + 1, action=2)])
    i += 1
    print(f"acked {i}", flush=True)
"""


def test_acknowledged_appends_survive_sigkill(store_url):
    """A writer killed with SIGKILL right after acknowledging loses none of its acknowledged events."""
    open_store(store_url).close()  # migrations done before the child starts
    child = subprocess.Popen([sys.executable, "-c", _CHILD, store_url], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    buffer, acked, deadline = b"", 0, time.monotonic() + 60
    try:
        while acked < 40:
            ready, _, _ = select.select([child.stdout], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(child.stdout.fileno(), 65536) if ready else b""
            if not chunk:
                pytest.fail(f"writer stopped or stalled after {acked} acks: {child.stderr.read1().decode()}")
            buffer += chunk
            acked = max([acked] + [int(line.split()[1]) for line in buffer.splitlines() if line.startswith(b"acked")])
        child.send_signal(signal.SIGKILL)  # mid-stream: the child is in its next append
    finally:
        child.kill()
        rest, _ = child.communicate()
    buffer += rest
    acked = max(int(line.split()[1]) for line in buffer.splitlines() if line.startswith(b"acked"))
    assert child.returncode == -signal.SIGKILL

    with open_store(store_url) as s:
        got = s.get_user("durable").realtime
    assert len(got) >= 2 * acked
    assert got[: 2 * acked] == [Event(i // 2, i, 1 + i % 2) for i in range(2 * acked)]
    assert len(got) % 2 == 0  # an append is atomic: both of its events or neither


def test_durability_settings(store):
    """SQLite: WAL + synchronous=FULL on every thread's connection; PostgreSQL: synchronous_commit=on."""
    if store.__class__.__name__ == "SQLiteStore":
        seen: list[tuple] = []

        def probe() -> None:
            conn = store._conn()
            seen.append(
                (conn.execute("PRAGMA journal_mode").fetchone()[0], conn.execute("PRAGMA synchronous").fetchone()[0])
            )

        probe()
        t = threading.Thread(target=probe)
        t.start()
        t.join()
        assert seen == [("wal", 2), ("wal", 2)]  # 2 = FULL
    else:
        with store._conn() as conn:
            assert conn.execute("SHOW synchronous_commit").fetchone()[0] == "on"
            assert conn.execute("SELECT current_schema()").fetchone()[0] == store.schema
