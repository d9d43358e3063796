"""PostgresStore: UserStore + Catalog on PostgreSQL (psycopg 3 with a psycopg_pool ConnectionPool).

URL: any libpq URL (``postgresql://user@host:5432/db`` or ``postgres://…``) plus optional
query parameters that grinfer reads and strips before handing the rest to libpq:

- ``schema=NAME``: keep every table in this schema (created if missing; lowercase identifier) by
  putting it on the connections' ``search_path``; the default is the server's search_path.
- ``pool_min=N`` / ``pool_max=N``: connection-pool bounds (default 1 and 10).
- ``pool_timeout_ms=N``: how long a call waits for a pooled connection (default 500).
- ``statement_timeout_ms=N``: PostgreSQL's statement_timeout on every connection (default 500, 0: none; bulk
  imports, catalogue writes and migrations lift it for their own transaction).
- ``call_timeout_ms=N``: the client-side deadline of one call (default 1000, 0: none; not for bulk imports
  and catalogue reads or writes). A hung server (stopped, frozen) never fires its own statement_timeout:
  past this deadline the call's connection is shut down (``deadline.Watchdog``) and the call fails as
  an outage. A pooled connection's check before use gets the pool timeout as its deadline.

Outages fail fast: a call that cannot get a connection within the pool timeout, or whose connection
breaks, raises `Unavailable` and opens a breaker (`resilient.Breaker`): for the next second every
call raises `Unavailable` at once, then one call tries the database again.

Migrations run at start in one transaction under a transaction-scoped advisory lock keyed by the
schema, so two processes starting at once apply them exactly once. Writes are explicit
transactions committed before the method returns (``synchronous_commit=on`` is forced on every
connection), so an acknowledged append is durable. Per-user writes (append, roll) first lock the
user's row, which serialises them: a user's seq order is its commit order and a roll folds exactly
the events committed before it.

Schema (version 2) mirrors the SQLite store: ``users(uid, id, profile bigint[], history_version,
rolled_upto)``, append-only ``events(seq identity, uid, item, ts, action)`` indexed on (uid, seq),
``items``, ``genre_names``, ``models`` (metadata jsonb) and ``schema_version``; version 2 adds
``event_keys(uid, key, digest, appended, realtime_events)``, the idempotency keys of appends; version 3
the model registry's tables (``registry_tables.py``); version 4 indexes ``event_keys.created_at`` for
pruning (``KeyRetention``: a retention window and a bound on the number of keys); version 5 adds
``users.revision``, bumped by every write that changes what ``get_user`` reads (profile, append, roll), for the
per-process record cache of ``checked.py``.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool, PoolTimeout

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
from grinfer.storage.base import Appended, Event, Roll, Unavailable, UserRecord
from grinfer.storage.deadline import Watchdog
from grinfer.storage.registry_tables import REGISTRY_TABLES
from grinfer.storage.resilient import Breaker

MIGRATIONS: list[tuple[int, list[str]]] = [
    (
        1,
        [
            """CREATE TABLE users (
                uid BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                id TEXT NOT NULL UNIQUE,
                profile BIGINT[] NOT NULL DEFAULT '{}',
                history_version INTEGER NOT NULL DEFAULT 0,
                rolled_upto BIGINT NOT NULL DEFAULT 0
            )""",
            """CREATE TABLE events (
                seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                uid BIGINT NOT NULL REFERENCES users(uid),
                item BIGINT NOT NULL,
                ts BIGINT NOT NULL,
                action INTEGER NOT NULL
            )""",
            "CREATE INDEX events_uid_seq ON events (uid, seq)",
            """CREATE TABLE items (
                item INTEGER PRIMARY KEY,
                raw_id BIGINT NOT NULL,
                title TEXT NOT NULL,
                genres BYTEA NOT NULL,
                year_bucket BIGINT NOT NULL
            )""",
            "CREATE TABLE genre_names (idx INTEGER PRIMARY KEY, name TEXT NOT NULL)",
            """CREATE TABLE models (
                id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                name TEXT NOT NULL UNIQUE,
                path TEXT NOT NULL,
                metadata JSONB NOT NULL,
                registered_at DOUBLE PRECISION NOT NULL
            )""",
        ],
    ),
    (
        2,
        [
            """CREATE TABLE event_keys (
                uid BIGINT NOT NULL REFERENCES users(uid),
                key TEXT NOT NULL,
                digest TEXT NOT NULL,
                appended INTEGER NOT NULL,
                realtime_events INTEGER NOT NULL,
                created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                PRIMARY KEY (uid, key)
            )""",
        ],
    ),
    (3, REGISTRY_TABLES),
    (4, ["CREATE INDEX event_keys_created_at ON event_keys (created_at)"]),  # keys are pruned oldest first
    (5, ["ALTER TABLE users ADD COLUMN revision BIGINT NOT NULL DEFAULT 0"]),  # bumped by every write to the user
]
SCHEMA_VERSION = MIGRATIONS[-1][0]

_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_GRINFER_PARAMS = ("schema", "pool_min", "pool_max", "pool_timeout_ms", "statement_timeout_ms", "call_timeout_ms")
# idempotency keys older than a cutoff or no newer than the boundary key (NULL: none), a batch at a time
_PRUNE_KEYS = """DELETE FROM event_keys WHERE ctid IN
    (SELECT ctid FROM event_keys WHERE created_at < %s OR created_at <= %s LIMIT %s)"""
# what a down, unreachable or restarting server raises (QueryCanceled, a statement timeout, is an OperationalError)
_OUTAGE = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout)

_GET_USER = """
SELECT u.profile, u.history_version, u.rolled_upto, u.revision, e.seq, e.item, e.ts, e.action
FROM users u LEFT JOIN events e ON e.uid = u.uid
WHERE u.id = %s ORDER BY e.ts, e.seq
"""
_LOCK_USER = "SELECT uid, rolled_upto FROM users WHERE id = %s FOR NO KEY UPDATE"


def parse_postgres_url(url: str) -> tuple[str, dict[str, str]]:
    """Split a store URL into the libpq URL and grinfer's own parameters (schema, pool_min, pool_max)."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError(f"not a PostgreSQL URL: {url!r} (expected postgresql://… or postgres://…)")
    ours: dict[str, str] = {}
    rest: list[tuple[str, str]] = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in _GRINFER_PARAMS:
            ours[key] = value
        else:
            rest.append((key, value))
    return urlunsplit(parts._replace(query=urlencode(rest))), ours


class PostgresStore:
    """UserStore and Catalog on PostgreSQL; thread-safe (a connection pool)."""

    def __init__(
        self,
        url: str,
        *,
        schema: str | None = None,
        min_size: int | None = None,
        max_size: int | None = None,
        connect_timeout_s: float = 10.0,
        key_retention: KeyRetention = KeyRetention(),
    ) -> None:
        conninfo, params = parse_postgres_url(url)
        schema = schema if schema is not None else params.get("schema")
        if schema is not None and not _SCHEMA_NAME.fullmatch(schema):
            raise ValueError(f"schema {schema!r} must be a lowercase identifier ([a-z_][a-z0-9_]*, ≤ 63 chars)")
        min_size = min_size if min_size is not None else _int_param(params, "pool_min", 1)
        max_size = max_size if max_size is not None else _int_param(params, "pool_max", 10)
        if not 0 <= min_size <= max_size or max_size < 1:
            raise ValueError(f"need 0 <= pool_min <= pool_max and pool_max >= 1, got {min_size} and {max_size}")
        self.schema = schema
        pool_timeout_ms = _int_param(params, "pool_timeout_ms", 500)
        statement_timeout_ms = _int_param(params, "statement_timeout_ms", 500)
        call_timeout_ms = _int_param(params, "call_timeout_ms", 1000)
        if pool_timeout_ms < 1 or statement_timeout_ms < 0 or call_timeout_ms < 0:
            raise ValueError(f"need pool_timeout_ms >= 1, statement_timeout_ms >= 0 and call_timeout_ms >= 0 "
                             f"(0: none), got {pool_timeout_ms}, {statement_timeout_ms} and {call_timeout_ms}")
        self._pool_timeout_s = pool_timeout_ms / 1000
        self._call_timeout_s = call_timeout_ms / 1000
        self._watchdog = Watchdog(f"store {self!r}")
        self._breaker = Breaker(f"store {self!r}", consequence=": answering 503 until it is back")
        self.key_pruning = KeyPruning(key_retention, self.prune_idempotency_keys)
        options = dict(parse_qsl(urlsplit(conninfo).query)).get("options", "")
        options = " ".join(filter(None, [options, "-c synchronous_commit=on",
                                         f"-c statement_timeout={statement_timeout_ms}"]))
        if schema is not None:
            options += f" -c search_path={schema}"
        kwargs = {"autocommit": True, "options": options, "connect_timeout": max(1, round(connect_timeout_s))}
        # Connect once directly: an unreachable server fails here with libpq's own message.
        with psycopg.connect(conninfo, **kwargs) as conn:
            self._migrate(conn)
        self._pool = ConnectionPool(
            conninfo,
            kwargs=kwargs,
            min_size=min_size,
            max_size=max_size,
            open=False,
            check=self._check_connection,
            name=f"grinfer-store-{schema or 'default'}",
        )
        self._pool.open(wait=True, timeout=connect_timeout_s)
        self._closed = False

    placeholder = "%s"  # the parameter marker of this store's SQL (grinfer.registry writes one dialect for both)

    @contextmanager
    def transaction(self) -> Iterator[psycopg.Connection]:
        """One transaction on a pooled connection for code outside this class (the model registry)."""
        with self._conn() as conn, conn.transaction():
            yield conn

    def _migrate(self, conn: psycopg.Connection) -> None:
        key = f"grinfer.storage.migrate:{self.schema or ''}"
        lock_id = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big", signed=True)
        with conn.transaction():
            conn.execute("SET LOCAL statement_timeout = 0")  # waiting for another process's migration is fine
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_id,))
            if self.schema is not None:
                conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema)))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version "
                "(version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            current = _one(conn.execute("SELECT coalesce(max(version), 0) FROM schema_version"))[0]
            if current > SCHEMA_VERSION:
                raise RuntimeError(
                    f"database schema version {current} is newer than this grinfer supports ({SCHEMA_VERSION})"
                )
            for version, statements in MIGRATIONS:
                if version > current:
                    for statement in statements:
                        conn.execute(statement)  # pyright: ignore[reportArgumentType, reportCallIssue] (our own SQL)
                    conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))

    def _check_connection(self, conn: psycopg.Connection) -> None:
        """The pool's check of a connection before use, with the pool timeout as its deadline."""
        with self._watchdog.guard(conn.pgconn.socket, self._pool_timeout_s):
            ConnectionPool.check_connection(conn)

    @contextmanager
    def _conn(self, bulk: bool = False) -> Iterator[psycopg.Connection]:
        """A pooled connection, through the breaker: an outage raises Unavailable (fast, see the module docstring).
        The call must end within call_timeout_ms unless it is `bulk` (imports, the catalogue)."""
        if self._closed:
            raise RuntimeError("PostgresStore is closed")
        if not self._breaker.allow():
            raise self._outage()
        try:
            with self._pool.connection(timeout=self._pool_timeout_s) as conn, \
                    self._watchdog.guard(conn.pgconn.socket, None if bulk else self._call_timeout_s):
                yield conn
        except _OUTAGE as exc:
            self._breaker.failure(exc)
            raise self._outage() from None
        self._breaker.success()

    def _outage(self) -> Unavailable:
        return Unavailable(f"PostgreSQL unreachable ({self._breaker.last_error}); retry shortly")

    def health(self) -> dict:
        """The breaker's state: {"degraded", "errors", "last_error"}."""
        return self._breaker.health()

    def schema_version(self) -> int:
        with self._conn() as conn:
            return _one(conn.execute("SELECT max(version) FROM schema_version"))[0]

    # -- UserStore ---------------------------------------------------------------------------

    def get_user(self, user: str) -> UserRecord | None:
        found = self.get_user_at(user)
        return None if found is None else found[0]

    def get_user_at(self, user: str) -> tuple[UserRecord, int] | None:
        """The user's record and its revision, read in one statement (one snapshot); None for an unknown user."""
        with self._conn() as conn:
            rows = conn.execute(_GET_USER, (user,)).fetchall()
        if not rows:
            return None
        profile, version, rolled_upto, revision = rows[0][:4]
        return build_record(user, profile, version, rolled_upto, (r[4:] for r in rows if r[4] is not None)), revision

    def user_revision(self, user: str) -> int | None:
        """The user's revision (one indexed lookup), or None for an unknown user."""
        with self._conn() as conn:
            row = conn.execute("SELECT revision FROM users WHERE id = %s", (user,)).fetchone()
        return None if row is None else row[0]

    def put_profile(self, user: str, profile: list[int]) -> None:
        values = [int(v) for v in profile]
        with self._conn() as conn, conn.transaction():
            conn.execute(
                """INSERT INTO users (id, profile) VALUES (%s, %s)
                   ON CONFLICT (id) DO UPDATE SET profile = EXCLUDED.profile, revision = users.revision + 1""",
                (user, values),
            )

    def append_events(self, user: str, events: list[Event]) -> int:
        rows = event_tuples(events)
        with self._conn() as conn, conn.transaction():
            return self._append(conn, *self._lock_user(conn, user), rows)

    def append_events_once(self, user: str, events: list[Event], key: str, digest: str) -> Appended:
        rows = event_tuples(events)
        with self._conn() as conn, conn.transaction():
            uid, rolled_upto = self._lock_user(conn, user)  # the row lock serialises retries of one key
            seen = conn.execute(
                "SELECT digest, appended, realtime_events FROM event_keys WHERE uid = %s AND key = %s", (uid, key)
            ).fetchone()
            if seen is not None:
                return replay_append(key, digest, *seen)
            count = self._append(conn, uid, rolled_upto, rows)
            conn.execute(
                "INSERT INTO event_keys (uid, key, digest, appended, realtime_events) VALUES (%s, %s, %s, %s, %s)",
                (uid, key, digest, len(rows), count),
            )
        self.key_pruning.after_append()
        return Appended(len(rows), count)

    def prune_idempotency_keys(self, now: float | None = None) -> int:
        """Delete the idempotency keys older than the retention window (at `now`, unix seconds; default the
        database's clock) and those beyond the newest `max_keys`, a batch per statement; returns the count."""
        retention = self.key_pruning.retention
        with self._conn() as conn:
            cutoff, boundary = _one(conn.execute(
                "SELECT coalesce(to_timestamp(%s::float8), now()) - make_interval(secs => %s), (SELECT created_at "
                "FROM event_keys ORDER BY created_at DESC LIMIT 1 OFFSET %s)",
                (now, retention.window_s, retention.max_keys)))
            deleted = 0
            while True:
                n = conn.execute(_PRUNE_KEYS, (cutoff, boundary, PRUNE_BATCH)).rowcount
                deleted += n
                if n < PRUNE_BATCH:
                    return deleted

    @staticmethod
    def _append(conn: psycopg.Connection, uid: int, rolled_upto: int, rows: list[tuple[int, int, int]]) -> int:
        """Insert the rows in order for a locked user; returns the user's R length."""
        if rows:
            items, ts, actions = (list(col) for col in zip(*rows))
            conn.execute(
                """INSERT INTO events (uid, item, ts, action)
                   SELECT %s, i, t, a FROM unnest(%s::bigint[], %s::bigint[], %s::int[])
                       WITH ORDINALITY AS x(i, t, a, n) ORDER BY n""",
                (uid, items, ts, actions),
            )
        conn.execute("UPDATE users SET revision = revision + 1 WHERE uid = %s", (uid,))
        return _one(conn.execute("SELECT count(*) FROM events WHERE uid = %s AND seq > %s", (uid, rolled_upto)))[0]

    @staticmethod
    def _lock_user(conn: psycopg.Connection, user: str) -> tuple[int, int]:
        """The user's (uid, rolled_upto), creating the user if needed; locks the row until commit."""
        row = conn.execute(_LOCK_USER, (user,)).fetchone()
        if row is None:
            row = conn.execute(
                "INSERT INTO users (id) VALUES (%s) ON CONFLICT (id) DO NOTHING RETURNING uid, rolled_upto", (user,)
            ).fetchone()
            if row is None:  # created by a concurrent transaction since our first look
                row = _one(conn.execute(_LOCK_USER, (user,)))
        return row[0], row[1]

    def roll_history(self, user: str) -> Roll:
        with self._conn() as conn, conn.transaction():
            row = conn.execute(
                "SELECT uid, history_version, rolled_upto FROM users WHERE id = %s FOR NO KEY UPDATE", (user,)
            ).fetchone()
            if row is None:
                raise KeyError(user)
            uid, version, rolled_upto = row
            # A new statement after the lock: its snapshot holds every append committed before the roll.
            count, last = _one(conn.execute(
                "SELECT count(*), max(seq) FROM events WHERE uid = %s AND seq > %s", (uid, rolled_upto)
            ))
            if count == 0:
                return Roll(version, 0)
            conn.execute(
                "UPDATE users SET history_version = %s, rolled_upto = %s, revision = revision + 1 WHERE uid = %s",
                (version + 1, last, uid),
            )
            return Roll(version + 1, count)

    def count_users(self) -> int:
        with self._conn() as conn:
            return _one(conn.execute("SELECT count(*) FROM users"))[0]

    def list_users(self, limit: int = 100, offset: int = 0) -> list[str]:
        check_page(limit, offset)
        with self._conn() as conn:
            rows = conn.execute("SELECT id FROM users ORDER BY uid LIMIT %s OFFSET %s", (limit, offset)).fetchall()
        return [r[0] for r in rows]

    def import_users(self, records: Iterable[UserRecord]) -> int:
        """Bulk-create new users in one transaction (COPY for events); returns the number of events.

        Each record is stored as given: profile, ``history_version``, ``static`` events (folded into
        S) then ``realtime`` events (R), in list order. A user that already exists raises ValueError
        and nothing of the batch is written.
        """
        records = list(records)
        check_new_users(records)
        names = [r.user for r in records]
        try:
            with self._conn(bulk=True) as conn, conn.transaction():
                cur = conn.cursor()
                cur.execute("SET LOCAL statement_timeout = 0")  # bulk COPY may take longer than a request
                cur.executemany(
                    "INSERT INTO users (id, profile, history_version) VALUES (%s, %s, %s)",
                    [(r.user, [int(v) for v in r.profile], int(r.history_version)) for r in records],
                )
                uids = dict(cur.execute("SELECT id, uid FROM users WHERE id = ANY(%s)", (names,)).fetchall())
                self._copy_events(cur, ((uids[r.user], r.static) for r in records))
                cur.execute(
                    """UPDATE users u SET rolled_upto = m.top
                       FROM (SELECT uid, max(seq) AS top FROM events WHERE uid = ANY(%s) GROUP BY uid) m
                       WHERE u.uid = m.uid""",
                    ([uids[r.user] for r in records if r.static],),
                )
                self._copy_events(cur, ((uids[r.user], r.realtime) for r in records))
        except psycopg.errors.UniqueViolation:
            with self._conn() as conn:
                rows = conn.execute("SELECT id FROM users WHERE id = ANY(%s) ORDER BY id", (names,)).fetchall()
            raise existing_users_error([r[0] for r in rows]) from None
        return sum(len(r.static) + len(r.realtime) for r in records)

    @staticmethod
    def _copy_events(cur: psycopg.Cursor, per_user: Iterable[tuple[int, list[Event]]]) -> None:
        with cur.copy("COPY events (uid, item, ts, action) FROM STDIN") as copy:
            for uid, events in per_user:
                for item, ts, action in event_tuples(events):
                    copy.write_row((uid, item, ts, action))

    # -- Catalog -----------------------------------------------------------------------------

    def put_catalog(self, catalog: ItemCatalog) -> None:
        """Replace the stored catalogue (items and genre names) in one transaction."""
        rows = catalog_rows(catalog)
        with self._conn(bulk=True) as conn, conn.transaction():
            cur = conn.cursor()
            cur.execute("SET LOCAL statement_timeout = 0")
            cur.execute("DELETE FROM items")
            cur.execute("DELETE FROM genre_names")
            with cur.copy("COPY items (item, raw_id, title, genres, year_bucket) FROM STDIN") as copy:
                for row in rows.items:
                    copy.write_row(row)
            cur.executemany("INSERT INTO genre_names (idx, name) VALUES (%s, %s)", rows.genre_names)

    def load_catalog(self) -> ItemCatalog | None:
        with self._conn(bulk=True) as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")  # one snapshot for both tables
            items = conn.execute("SELECT item, raw_id, title, genres, year_bucket FROM items ORDER BY item").fetchall()
            names = [r[0] for r in conn.execute("SELECT name FROM genre_names ORDER BY idx").fetchall()]
        return catalog_from_rows(items, names) if items else None

    def register_model(self, name: str, path: str, metadata: dict) -> None:
        """Record a model version; registering an existing name replaces its path and metadata."""
        meta = metadata_json(metadata)
        with self._conn() as conn, conn.transaction():
            conn.execute(
                """INSERT INTO models (name, path, metadata, registered_at) VALUES (%s, %s, %s::jsonb, %s)
                   ON CONFLICT (name) DO UPDATE SET path = EXCLUDED.path, metadata = EXCLUDED.metadata,
                       registered_at = EXCLUDED.registered_at""",
                (name, str(path), meta, time.time()),
            )

    def list_models(self) -> list[dict]:
        """Registered models in registration order: dicts with name, path, metadata, registered_at."""
        with self._conn() as conn:
            rows = conn.execute("SELECT name, path, metadata, registered_at FROM models ORDER BY id").fetchall()
        return [{"name": n, "path": p, "metadata": m, "registered_at": t} for n, p, m, t in rows]

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        """Close the pool; further calls raise RuntimeError. Idempotent."""
        if not self._closed:
            self._closed = True
            self._pool.close()

    def __enter__(self) -> PostgresStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PostgresStore(schema={self.schema!r})"


def _int_param(params: dict[str, str], key: str, default: int) -> int:
    if key not in params:
        return default
    try:
        return int(params[key])
    except ValueError:
        raise ValueError(f"store URL parameter {key} must be an integer, got {params[key]!r}") from None


def _one(cursor: psycopg.Cursor) -> tuple:
    """The single row of a query that always returns one (an aggregate, a locked existing row)."""
    row = cursor.fetchone()
    if row is None:
        raise RuntimeError("PostgreSQL: a query that always returns a row returned none")
    return row
