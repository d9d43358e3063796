"""Per-user revisions and RevisionCheckedStore: every write bumps the revision, a write through another
connection or process is seen by the next read, and generated interleavings of writes and reads give the
records the uncached store gives. Run against SQLite (a temp file) and PostgreSQL (a temp schema)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import uuid

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql

from grinfer.storage import open_store
from grinfer.storage import postgres as pg_module
from grinfer.storage import sqlite as sqlite_module
from grinfer.storage.base import Event
from grinfer.storage.checked import RevisionCheckedStore
from grinfer.storage.postgres import parse_postgres_url


def ev(item: int, ts: int, action: int = 3) -> Event:
    return Event(item=item, ts=ts, action=action)


def test_every_write_bumps_the_revision_and_nothing_else_does(store):
    assert store.user_revision("u") is None and store.get_user_at("u") is None

    def revision() -> int:
        now = store.user_revision("u")
        assert store.get_user_at("u")[1] == now  # the record's revision is the one the lookup gives
        return now

    store.put_profile("u", [1, 2])
    created = revision()
    store.put_profile("u", [3, 4])
    profiled = revision()
    store.append_events("u", [ev(1, 10)])
    appended = revision()
    assert store.roll_history("u").folded == 1
    rolled = revision()
    assert created < profiled < appended < rolled
    assert store.roll_history("u").folded == 0  # nothing to fold: nothing changed
    assert revision() == rolled
    assert not store.append_events_once("u", [ev(2, 20)], "k", "d").replayed
    keyed = revision()
    assert keyed > rolled
    assert store.append_events_once("u", [ev(2, 20)], "k", "d").replayed  # a retry writes nothing
    store.count_users()
    store.list_users()
    assert revision() == keyed
    store.append_events("new", [ev(3, 30)])
    assert store.user_revision("new") is not None


def test_a_write_through_another_connection_is_seen_by_the_next_read(store_url):
    with open_store(store_url) as plain, open_store(store_url) as other:
        checked = RevisionCheckedStore(plain)
        other.append_events("u", [ev(1, 10)])
        assert checked.get_user("u").realtime == [ev(1, 10)]
        assert checked.get_user("u").realtime == [ev(1, 10)]
        assert checked.stats() == {"hits": 1, "reads": 1, "held": 1}
        other.append_events("u", [ev(2, 20)])
        assert checked.current("u") is None  # its revision moved: the held record is not served
        assert checked.get_user("u").realtime == [ev(1, 10), ev(2, 20)]
        other.put_profile("u", [7])
        assert checked.get_user("u").profile == [7]
        other.roll_history("u")
        got = checked.get_user("u")
        assert (got.history_version, got.static, got.realtime) == (1, [ev(1, 10), ev(2, 20)], [])
        got.static.clear()  # a caller's copy: what is held is untouched
        assert checked.get_user("u") == other.get_user("u")
        assert checked.stats()["reads"] == 4


def test_a_write_in_another_process_is_seen_by_the_next_read(store_url):
    with open_store(store_url) as plain:
        checked = RevisionCheckedStore(plain)
        plain.append_events("u", [ev(1, 10)])
        assert checked.get_user("u").realtime == [ev(1, 10)]
        code = ("import sys; from grinfer.storage import open_store; from grinfer.storage.base import Event\n"
                "with open_store(sys.argv[1]) as s: s.append_events('u', [Event(2, 20, 4)])")
        subprocess.run([sys.executable, "-c", code, store_url], check=True, timeout=120)
        assert checked.get_user("u").realtime == [ev(1, 10), ev(2, 20, 4)]


def test_reads_racing_writes_never_go_back(store_url):
    """A reader thread through the checked store while another connection appends: the R it sees only grows,
    and once the writer stops it is the uncached store's."""
    with open_store(store_url) as plain, open_store(store_url) as other:
        checked = RevisionCheckedStore(plain)
        stop = threading.Event()
        lengths: list[int] = []

        def read() -> None:
            while not stop.is_set():
                record = checked.get_user("u")
                lengths.append(0 if record is None else len(record.realtime))

        reader = threading.Thread(target=read)
        reader.start()
        try:
            for i in range(60):
                other.append_events("u", [ev(i, i)])
        finally:
            stop.set()
            reader.join()
        assert lengths == sorted(lengths) and len(lengths) > 1
        assert checked.get_user("u") == other.get_user("u") and len(other.get_user("u").realtime) == 60


OPS = st.lists(st.tuples(st.sampled_from(["profile", "append", "once", "roll", "read"]), st.integers(0, 2),
                         st.integers(0, 5)), min_size=1, max_size=25)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_interleaved_writes_and_reads_match_the_uncached_store(store_url, ops):
    """Writes through one connection (another process, as far as the cache can tell) and reads through the
    checked store on another, in any order: every read is what the uncached store reads."""
    run = uuid.uuid4().hex[:8]  # the examples share one database: users of their own
    with open_store(store_url) as plain, open_store(store_url) as writer:
        checked = RevisionCheckedStore(plain, max_users=2)  # fewer than the users: evictions too
        for op, u, n in ops:
            user = f"{run}-{u}"
            if op == "profile":
                writer.put_profile(user, [n, n + 1])
            elif op == "append":
                writer.append_events(user, [ev(n, 100 + n)] * (n % 3 + 1))
            elif op == "once":
                writer.append_events_once(user, [ev(n, 200)], f"key-{n}", f"digest-{n}")
            elif op == "roll" and writer.get_user(user) is not None:
                writer.roll_history(user)
            assert checked.get_user(user) == writer.get_user(user)


def test_a_version_4_database_is_migrated_in_place(store_url):
    """A database written before revisions: opening it adds the column, keeps the data, and revisions work."""
    if store_url.startswith("sqlite"):
        before = [sql for version, statements in sqlite_module.MIGRATIONS if version <= 4 for sql in statements]
        conn = sqlite3.connect(store_url.removeprefix("sqlite://"), isolation_level=None)
        conn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)")
        for statement in before:
            conn.execute(statement)
        conn.executemany("INSERT INTO schema_version VALUES (?, 0)", [(v,) for v in range(1, 5)])
        conn.execute("INSERT INTO users (id, profile) VALUES ('old', '[5]')")
        conn.execute("INSERT INTO events (uid, item, ts, action) VALUES (1, 9, 10, 4)")
        conn.close()
    else:
        conninfo, params = parse_postgres_url(store_url)
        schema = sql.Identifier(params["schema"])
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(schema))
            conn.execute(sql.SQL("SET search_path = {}").format(schema))
            conn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ "
                         "NOT NULL DEFAULT now())")
            for version, statements in pg_module.MIGRATIONS:
                for statement in statements if version <= 4 else ():
                    conn.execute(statement)
            conn.execute("INSERT INTO schema_version (version) SELECT generate_series(1, 4)")
            uid = conn.execute("INSERT INTO users (id, profile) VALUES ('old', '{5}') RETURNING uid").fetchone()[0]
            conn.execute("INSERT INTO events (uid, item, ts, action) VALUES (%s, 9, 10, 4)", (uid,))
    with open_store(store_url) as s:
        assert s.schema_version() == sqlite_module.SCHEMA_VERSION == 5
        assert s.get_user_at("old") == (s.get_user("old"), 0)
        assert s.get_user("old").profile == [5] and s.get_user("old").realtime == [ev(9, 10, 4)]
        s.append_events("old", [ev(1, 20)])
        assert s.user_revision("old") == 1


def test_max_users_is_checked():
    with pytest.raises(ValueError, match="max_users"):
        RevisionCheckedStore(None, max_users=0)  # pyright: ignore[reportArgumentType]
