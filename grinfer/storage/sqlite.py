"""SQLiteStore: UserStore + Catalog on one SQLite file (the default store).

Durability: WAL journal with ``synchronous=FULL`` on every connection, and every write is one
``BEGIN IMMEDIATE … COMMIT`` that finishes before the method returns, so an acknowledged append
survives a ``kill -9`` of the process (and, with FULL, an OS crash or power loss).

Concurrency: one connection per thread (WAL lets readers run beside the writer); writers in this
process take a lock, and writers in other processes wait on SQLite's busy timeout.

Schema (version 2): ``users(uid, id, profile JSON, history_version, rolled_upto)``, append-only
``events(seq AUTOINCREMENT, uid, item, ts, action)``, ``items(item, raw_id, title, genres,
year_bucket)``, ``genre_names(idx, name)``, ``models(id, name, path, metadata JSON,
registered_at)`` and ``schema_version(version, applied_at)``. A user's S is its events with
``seq <= rolled_upto``; R is the rest. Events come back ordered by (ts, seq). Version 2 adds
``event_keys(uid, key, digest, appended, realtime_events)``: the idempotency keys of appends. Version 3
adds the model registry's tables (``registry_tables.py``: model versions, experiments and their arms).
Version 4 indexes ``event_keys.created_at``: keys past their retention window (or beyond the newest
``KeyRetention.max_keys``) are pruned after keyed appends. Version 5 adds ``users.revision``, bumped by every
write that changes what ``get_user`` reads (profile, append, roll), so a per-process record cache
(``checked.py``) can tell with one indexed lookup whether its copy is still current.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from grinfer.data.types import ItemCatalog
from grinfer.storage._common import (
    PRUNE_BATCH,
    KeyPruning,
    KeyRetention,
    build_record,
    catalog_from_rows,
    catalog_rows,
    check_new_users,
    check_page,
    event_tuples,
    existing_users_error,
    metadata_json,
    replay_append,
)
from grinfer.storage.base import Appended, Event, Roll, UserRecord
from grinfer.storage.registry_tables import REGISTRY_TABLES

# Each migration is a list of statements run in one transaction; append, never edit.
MIGRATIONS: list[tuple[int, list[str]]] = [
    (
        1,
        [
            """CREATE TABLE users (
                uid INTEGER PRIMARY KEY,
                id TEXT NOT NULL UNIQUE,
                profile TEXT NOT NULL DEFAULT '[]',
                history_version INTEGER NOT NULL DEFAULT 0,
                rolled_upto INTEGER NOT NULL DEFAULT 0
            )""",
            """CREATE TABLE events (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                uid INTEGER NOT NULL REFERENCES users(uid),
                item INTEGER NOT NULL,
                ts INTEGER NOT NULL,
                action INTEGER NOT NULL
            )""",
            "CREATE INDEX events_uid_seq ON events (uid, seq)",
            """CREATE TABLE items (
                item INTEGER PRIMARY KEY,
                raw_id INTEGER NOT NULL,
                title TEXT NOT NULL,
                genres BLOB NOT NULL,
                year_bucket INTEGER NOT NULL
            )""",
            "CREATE TABLE genre_names (idx INTEGER PRIMARY KEY, name TEXT NOT NULL)",
            """CREATE TABLE models (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                name TEXT NOT NULL UNIQUE,
                path TEXT NOT NULL,
                metadata TEXT NOT NULL,
                registered_at REAL NOT NULL
            )""",
        ],
    ),
    (
        2,
        [
            """CREATE TABLE event_keys (
                uid INTEGER NOT NULL REFERENCES users(uid),
                key TEXT NOT NULL,
                digest TEXT NOT NULL,
                appended INTEGER NOT NULL,
                realtime_events INTEGER NOT NULL,
                created_at REAL NOT NULL,
                PRIMARY KEY (uid, key)
            )""",
        ],
    ),
    (3, REGISTRY_TABLES),
    (4, ["CREATE INDEX event_keys_created_at ON event_keys (created_at)"]),  # idempotency keys are pruned oldest first
    (5, ["ALTER TABLE users ADD COLUMN revision INTEGER NOT NULL DEFAULT 0"]),  # bumped by every write to the user
]
SCHEMA_VERSION = MIGRATIONS[-1][0]

_GET_USER = """
SELECT u.profile, u.history_version, u.rolled_upto, u.revision, e.seq, e.item, e.ts, e.action
FROM users u LEFT JOIN events e ON e.uid = u.uid
WHERE u.id = ? ORDER BY e.ts, e.seq
"""

# idempotency keys older than a cutoff or no newer than the boundary key (NULL: none), a batch at a time
_PRUNE_KEYS = """DELETE FROM event_keys WHERE rowid IN
    (SELECT rowid FROM event_keys WHERE created_at < ? OR created_at <= ? LIMIT ?)"""


class SQLiteStore:
    """UserStore and Catalog on one SQLite file; safe to share between threads."""

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 30.0,
                 key_retention: KeyRetention = KeyRetention()) -> None:
        if str(path) == ":memory:" or str(path).startswith("file:"):
            raise ValueError("SQLiteStore needs a file path (per-thread connections cannot share :memory:)")
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._conns: dict[int, tuple[threading.Thread, sqlite3.Connection]] = {}
        self._conns_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._closed = False
        self.key_pruning = KeyPruning(key_retention, self.prune_idempotency_keys)
        mode = self._switch_to_wal(self._conn())
        if mode.lower() != "wal":
            raise RuntimeError(f"{self.path}: SQLite could not switch to WAL mode (journal_mode={mode})")
        self._migrate()

    # -- connections and transactions -------------------------------------------------------

    def _switch_to_wal(self, conn: sqlite3.Connection) -> str:
        """PRAGMA journal_mode=WAL, retried for up to the busy timeout: the switch takes the file's exclusive lock
        without SQLite's busy handler, so processes or threads opening a new file at once get "database is
        locked" at once (4 in 200 four-way opens here)."""
        deadline = time.monotonic() + self._busy_timeout_s
        while True:
            try:
                return conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)

    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise RuntimeError(f"SQLiteStore({self.path}) is closed")
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        conn = sqlite3.connect(self.path, timeout=self._busy_timeout_s, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        me = threading.current_thread()
        with self._conns_lock:
            for ident, (thread, old) in list(self._conns.items()):  # connections of finished threads
                if not thread.is_alive():
                    old.close()
                    del self._conns[ident]
            self._conns[me.ident or 0] = (me, conn)
        self._local.conn = conn
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: committed (durably) on normal exit, rolled back on error."""
        conn = self._conn()
        with self._write_lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    placeholder = "?"  # the parameter marker of this store's SQL (grinfer.registry writes one dialect for both)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction for code outside this class (the model registry): committed on normal exit."""
        with self._write() as c:
            yield c

    def _migrate(self) -> None:
        with self._write() as c:
            c.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
            )
            current = c.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0]
            if current > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.path} has schema version {current}, newer than this grinfer supports ({SCHEMA_VERSION})"
                )
            for version, statements in MIGRATIONS:
                if version > current:
                    for sql in statements:
                        c.execute(sql)
                    c.execute("INSERT INTO schema_version VALUES (?, ?)", (version, time.time()))

    def schema_version(self) -> int:
        return self._conn().execute("SELECT max(version) FROM schema_version").fetchone()[0]

    # -- UserStore ---------------------------------------------------------------------------

    def get_user(self, user: str) -> UserRecord | None:
        found = self.get_user_at(user)
        return None if found is None else found[0]

    def get_user_at(self, user: str) -> tuple[UserRecord, int] | None:
        """The user's record and its revision, read in one statement (one snapshot); None for an unknown user."""
        rows = self._conn().execute(_GET_USER, (user,)).fetchall()
        if not rows:
            return None
        profile, version, rolled_upto, revision = rows[0][:4]
        events = (r[4:] for r in rows if r[4] is not None)
        return build_record(user, json.loads(profile), version, rolled_upto, events), revision

    def user_revision(self, user: str) -> int | None:
        """The user's revision (one indexed lookup), or None for an unknown user."""
        row = self._conn().execute("SELECT revision FROM users WHERE id = ?", (user,)).fetchone()
        return None if row is None else row[0]

    def put_profile(self, user: str, profile: list[int]) -> None:
        text = json.dumps([int(v) for v in profile])
        with self._write() as c:
            c.execute(
                """INSERT INTO users (id, profile) VALUES (?, ?)
                   ON CONFLICT (id) DO UPDATE SET profile = excluded.profile, revision = users.revision + 1""",
                (user, text),
            )

    def append_events(self, user: str, events: list[Event]) -> int:
        rows = event_tuples(events)
        with self._write() as c:
            return self._append(c, *self._user_for_write(c, user), rows)

    def append_events_once(self, user: str, events: list[Event], key: str, digest: str) -> Appended:
        rows = event_tuples(events)
        with self._write() as c:
            uid, rolled_upto = self._user_for_write(c, user)
            seen = c.execute(
                "SELECT digest, appended, realtime_events FROM event_keys WHERE uid = ? AND key = ?", (uid, key)
            ).fetchone()
            if seen is not None:
                return replay_append(key, digest, *seen)
            count = self._append(c, uid, rolled_upto, rows)
            row = (uid, key, digest, len(rows), count, time.time())
            c.execute("INSERT INTO event_keys VALUES (?, ?, ?, ?, ?, ?)", row)
        self.key_pruning.after_append()
        return Appended(len(rows), count)

    def prune_idempotency_keys(self, now: float | None = None) -> int:
        """Delete the idempotency keys older than the retention window (at `now`, unix seconds) and those
        beyond the newest `max_keys`, in short transactions; returns how many were deleted."""
        retention = self.key_pruning.retention
        cutoff = (time.time() if now is None else now) - retention.window_s
        boundary = self._conn().execute("SELECT created_at FROM event_keys ORDER BY created_at DESC LIMIT 1 OFFSET ?",
                                        (retention.max_keys,)).fetchone()
        deleted = 0
        while True:
            with self._write() as c:
                n = c.execute(_PRUNE_KEYS, (cutoff, boundary and boundary[0], PRUNE_BATCH)).rowcount
            deleted += n
            if n < PRUNE_BATCH:
                return deleted

    @staticmethod
    def _append(c: sqlite3.Connection, uid: int, rolled_upto: int, rows: list[tuple[int, int, int]]) -> int:
        """Insert the rows for a user inside a write transaction; returns the user's R length."""
        c.executemany("INSERT INTO events (uid, item, ts, action) VALUES (?, ?, ?, ?)", [(uid, *r) for r in rows])
        c.execute("UPDATE users SET revision = revision + 1 WHERE uid = ?", (uid,))
        return c.execute("SELECT count(*) FROM events WHERE uid = ? AND seq > ?", (uid, rolled_upto)).fetchone()[0]

    @staticmethod
    def _user_for_write(c: sqlite3.Connection, user: str) -> tuple[int, int]:
        row = c.execute("SELECT uid, rolled_upto FROM users WHERE id = ?", (user,)).fetchone()
        if row is None:
            uid = c.execute("INSERT INTO users (id) VALUES (?)", (user,)).lastrowid
            assert uid is not None  # an INSERT sets it
            return uid, 0
        return row

    def roll_history(self, user: str) -> Roll:
        with self._write() as c:
            row = c.execute("SELECT uid, history_version, rolled_upto FROM users WHERE id = ?", (user,)).fetchone()
            if row is None:
                raise KeyError(user)
            uid, version, rolled_upto = row
            count, last = c.execute(
                "SELECT count(*), max(seq) FROM events WHERE uid = ? AND seq > ?", (uid, rolled_upto)
            ).fetchone()
            if count == 0:
                return Roll(version, 0)
            c.execute("UPDATE users SET history_version = ?, rolled_upto = ?, revision = revision + 1 WHERE uid = ?",
                      (version + 1, last, uid))
            return Roll(version + 1, count)

    def count_users(self) -> int:
        return self._conn().execute("SELECT count(*) FROM users").fetchone()[0]

    def list_users(self, limit: int = 100, offset: int = 0) -> list[str]:
        check_page(limit, offset)
        rows = self._conn().execute("SELECT id FROM users ORDER BY uid LIMIT ? OFFSET ?", (limit, offset))
        return [r[0] for r in rows]

    def import_users(self, records: Iterable[UserRecord]) -> int:
        """Bulk-create new users in one transaction; returns the number of events written.

        Each record is stored as given: its profile, ``history_version``, ``static`` events (folded
        into S) and then ``realtime`` events (R), in list order. A user that already exists raises
        ValueError and nothing of the batch is written.
        """
        records = list(records)
        check_new_users(records)
        with self._write() as c:
            try:
                c.executemany(
                    "INSERT INTO users (id, profile, history_version) VALUES (?, ?, ?)",
                    [(r.user, json.dumps([int(v) for v in r.profile]), int(r.history_version)) for r in records],
                )
            except sqlite3.IntegrityError:
                raise existing_users_error(self._existing(c, [r.user for r in records])) from None
            uids = self._uids(c, [r.user for r in records])
            insert = "INSERT INTO events (uid, item, ts, action) VALUES (?, ?, ?, ?)"
            c.executemany(insert, ((uids[r.user], *e) for r in records for e in event_tuples(r.static)))
            rolled = [uids[r.user] for r in records if r.static]
            for i in range(0, len(rolled), 500):
                chunk = rolled[i : i + 500]
                c.execute(
                    f"""UPDATE users SET rolled_upto = (SELECT max(seq) FROM events WHERE events.uid = users.uid)
                        WHERE uid IN ({",".join("?" * len(chunk))})""",
                    chunk,
                )
            c.executemany(insert, ((uids[r.user], *e) for r in records for e in event_tuples(r.realtime)))
        return sum(len(r.static) + len(r.realtime) for r in records)

    @staticmethod
    def _uids(c: sqlite3.Connection, users: list[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for i in range(0, len(users), 500):
            chunk = users[i : i + 500]
            sql = f"SELECT id, uid FROM users WHERE id IN ({','.join('?' * len(chunk))})"
            out.update(c.execute(sql, chunk).fetchall())
        return out

    def _existing(self, c: sqlite3.Connection, users: list[str]) -> list[str]:
        return sorted(self._uids(c, users))

    # -- Catalog -----------------------------------------------------------------------------

    def put_catalog(self, catalog: ItemCatalog) -> None:
        """Replace the stored catalogue (items and genre names) in one transaction."""
        rows = catalog_rows(catalog)
        with self._write() as c:
            c.execute("DELETE FROM items")
            c.execute("DELETE FROM genre_names")
            c.executemany("INSERT INTO items VALUES (?, ?, ?, ?, ?)", rows.items)
            c.executemany("INSERT INTO genre_names VALUES (?, ?)", rows.genre_names)

    def load_catalog(self) -> ItemCatalog | None:
        conn = self._conn()
        conn.execute("BEGIN")  # one snapshot for both tables
        try:
            items = conn.execute("SELECT item, raw_id, title, genres, year_bucket FROM items ORDER BY item").fetchall()
            names = [r[0] for r in conn.execute("SELECT name FROM genre_names ORDER BY idx")]
        finally:
            conn.execute("COMMIT")
        return catalog_from_rows(items, names) if items else None

    def register_model(self, name: str, path: str, metadata: dict) -> None:
        """Record a model version; registering an existing name replaces its path and metadata."""
        meta = metadata_json(metadata)
        with self._write() as c:
            c.execute(
                """INSERT INTO models (name, path, metadata, registered_at) VALUES (?, ?, ?, ?)
                   ON CONFLICT (name) DO UPDATE SET path = excluded.path, metadata = excluded.metadata,
                       registered_at = excluded.registered_at""",
                (name, str(path), meta, time.time()),
            )

    def list_models(self) -> list[dict]:
        """Registered models in registration order: dicts with name, path, metadata, registered_at."""
        rows = self._conn().execute("SELECT name, path, metadata, registered_at FROM models ORDER BY id")
        return [{"name": n, "path": p, "metadata": json.loads(m), "registered_at": t} for n, p, m, t in rows]

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        """Close every thread's connection; further calls raise RuntimeError. Idempotent."""
        self._closed = True
        with self._conns_lock:
            for _, conn in self._conns.values():
                conn.close()
            self._conns.clear()

    def __enter__(self) -> SQLiteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r})"
