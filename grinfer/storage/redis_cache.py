"""RedisFeatureCache: FeatureCache on Redis (redis-py), shared by every server process.

URL: ``redis://[:password@]host:port/db`` or ``rediss://…`` (TLS), with an optional
``prefix=…`` query parameter (default ``grinfer:``); other query parameters go to redis-py.
Keys: ``{prefix}u:{user}`` for user records, ``{prefix}r:{key}`` for result blobs, each written
with ``SET … PX`` (TTL in milliseconds, at least 1).

A user record is packed with `struct` (little-endian): a header ``b"GRU1"``, history_version (i64),
profile length, S length, R length (u32 each), then the profile values and (item, ts, action) of
each S and R event as i64. ``get_users`` is one MGET and ``put_users`` one pipeline, so a batch of
users costs one round trip. Redis errors propagate (`open_cache` wraps this cache in a
`ResilientCache`, which makes an outage a miss); a payload that is not a record is treated as a miss.
Socket timeouts are short (250 ms, ``?socket_timeout=S`` in the URL overrides) and a failed command
is not retried here, so a hung Redis costs a request at most one timeout.
"""

from __future__ import annotations

import re
import struct
import threading
from collections.abc import Iterable
from itertools import chain
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from grinfer.storage.base import Event, UserRecord
from grinfer.storage.memory import check_ttl

DEFAULT_PREFIX = "grinfer:"
DEFAULT_SOCKET_TIMEOUT_S = 0.25
_MAGIC = b"GRU1"
_HEADER = struct.Struct("<4sqIII")


def encode_user(record: UserRecord) -> bytes:
    """Pack a UserRecord (all but its user id, which the key holds) into bytes."""
    profile, s, r = record.profile, record.static, record.realtime
    values = list(profile)
    for e in chain(s, r):
        values += (e.item, e.ts, e.action)
    header = _HEADER.pack(_MAGIC, record.history_version, len(profile), len(s), len(r))
    return header + struct.pack(f"<{len(values)}q", *values)


def decode_user(user: str, payload: bytes) -> UserRecord | None:
    """The record packed by `encode_user`, or None if `payload` is not one."""
    if len(payload) < _HEADER.size:
        return None
    magic, version, n_profile, n_static, n_realtime = _HEADER.unpack_from(payload)
    n = n_profile + 3 * (n_static + n_realtime)
    if magic != _MAGIC or len(payload) != _HEADER.size + 8 * n:
        return None
    values = struct.unpack_from(f"<{n}q", payload, _HEADER.size)
    s_end = n_profile + 3 * n_static
    return UserRecord(
        user=user,
        profile=list(values[:n_profile]),
        history_version=version,
        static=_events(values[n_profile:s_end]),
        realtime=_events(values[s_end:]),
    )


def _events(flat: tuple[int, ...]) -> list[Event]:
    return list(map(Event, flat[0::3], flat[1::3], flat[2::3]))


def parse_redis_url(url: str) -> tuple[str, str]:
    """Split a cache URL into the redis-py URL and the key prefix."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"not a Redis URL: {url!r} (expected redis://host:port/db or rediss://…)")
    prefix, rest = DEFAULT_PREFIX, []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "prefix":
            prefix = value
        else:
            rest.append((key, value))
    return urlunsplit(parts._replace(query=urlencode(rest))), prefix


class RedisFeatureCache:
    """FeatureCache on Redis; thread-safe (redis-py's connection pool)."""

    in_process = False
    errors = (redis.RedisError, OSError)  # what an unreachable or hung Redis raises

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str | None = None,
        socket_timeout_s: float = DEFAULT_SOCKET_TIMEOUT_S,
        client_name: str | None = None,
    ) -> None:
        redis_url, url_prefix = parse_redis_url(url)
        self.prefix = url_prefix if prefix is None else prefix
        self._client = redis.Redis.from_url(
            redis_url,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            retry=Retry(NoBackoff(), 0),
            client_name=client_name,
        )
        self._lock = threading.Lock()
        self._hits = self._misses = self._round_trips = 0
        self._round_trip(self._client.ping)  # fail at start, with redis-py's message, if unreachable

    def _round_trip(self, fn, *args, **kwargs):
        with self._lock:
            self._round_trips += 1
        return fn(*args, **kwargs)

    def _count(self, hits: int, misses: int) -> None:
        with self._lock:
            self._hits += hits
            self._misses += misses

    def _user_key(self, user: str) -> str:
        return f"{self.prefix}u:{user}"

    def _result_key(self, key: str) -> str:
        return f"{self.prefix}r:{key}"

    @staticmethod
    def _px(ttl_s: float) -> int:
        return max(1, round(check_ttl(ttl_s) * 1000))

    # -- FeatureCache ----------------------------------------------------------------------------

    def get_user(self, user: str) -> UserRecord | None:
        return self.get_users([user])[0]

    def put_user(self, record: UserRecord, ttl_s: float) -> None:
        self._round_trip(self._client.set, self._user_key(record.user), encode_user(record), px=self._px(ttl_s))

    def get_users(self, users: Iterable[str]) -> list[UserRecord | None]:
        """Many users in one MGET, in the order asked (None for each miss)."""
        users = list(users)
        if not users:
            return []
        payloads = self._round_trip(self._client.mget, [self._user_key(u) for u in users])
        out = [None if p is None else decode_user(u, p) for u, p in zip(users, payloads)]
        hits = sum(r is not None for r in out)
        self._count(hits, len(out) - hits)
        return out

    def put_users(self, records: Iterable[UserRecord], ttl_s: float) -> None:
        """Many records in one pipelined round trip, all with the same TTL."""
        px = self._px(ttl_s)
        pipe = self._client.pipeline(transaction=False)
        n = 0
        for record in records:
            pipe.set(self._user_key(record.user), encode_user(record), px=px)
            n += 1
        if n:
            self._round_trip(pipe.execute)

    def invalidate_user(self, user: str) -> None:
        self._round_trip(self._client.delete, self._user_key(user))

    def get_result(self, key: str) -> bytes | None:
        value = self._round_trip(self._client.get, self._result_key(key))
        self._count(value is not None, value is None)
        return value

    def put_result(self, key: str, value: bytes, ttl_s: float) -> None:
        self._round_trip(self._client.set, self._result_key(key), bytes(value), px=self._px(ttl_s))

    # -- housekeeping ----------------------------------------------------------------------------

    def keys(self) -> list[bytes]:
        """Every key under this cache's prefix (SCAN; for tests and operations, not the hot path)."""
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", self.prefix) + "*"
        return list(self._client.scan_iter(match=pattern, count=1000))

    def clear(self) -> None:
        """Delete every key under this cache's prefix."""
        keys = self.keys()
        for i in range(0, len(keys), 1000):
            self._round_trip(self._client.delete, *keys[i : i + 1000])

    def stats(self) -> dict[str, int]:
        """Counters since creation: hits, misses and round trips to Redis."""
        with self._lock:
            return {"hits": self._hits, "misses": self._misses, "round_trips": self._round_trips}

    def close(self) -> None:
        self._client.close()

    def __repr__(self) -> str:
        return f"RedisFeatureCache(prefix={self.prefix!r})"
