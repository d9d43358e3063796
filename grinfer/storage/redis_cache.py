"""RedisFeatureCache: FeatureCache on Redis (redis-py), shared by every server process.

URL: ``redis://[:password@]host:port/db`` or ``rediss://…`` (TLS), with an optional
``prefix=…`` query parameter (default ``grinfer:``); other query parameters go to redis-py.
Keys: ``{prefix}u:{user}`` for user records, ``{prefix}r:{key}`` for result blobs, each written
with ``SET … PX`` (TTL in milliseconds, at least 1), and ``{prefix}w:{user}``, the user's write epoch.

Fleet-wide freshness (many replicas on one Redis): `invalidate_user` deletes the record and bumps the
write epoch in one transaction. A record is stored tagged with the epoch its reader saw when it missed
(`get_users` reads record and epoch in the same MGET; the epoch is remembered per thread until that
thread's `put_user`), and a lookup serves a record only while its tag is the current epoch. So a reader
that read the store before another replica's write cannot re-cache the stale copy: its tag is already
old. Epoch keys live `EPOCH_TTL_S`, far longer than any record (TTLs are capped at `MAX_RECORD_TTL_S`).

History rolls are announced on the channel ``{prefix}rolls`` (`publish_roll`, `subscribe_rolls`) so
every replica can free the user's K/V of older versions at once; a missed message costs memory only,
since the engine keys K/V by history version.

A user record is packed with `struct` (little-endian): a header ``b"GRU1"``, history_version (i64),
profile length, S length, R length (u32 each), then the profile values and (item, ts, action) of
each S and R event as i64. ``get_users`` is one MGET and ``put_users`` one pipeline, so a batch of
users costs one round trip. Redis errors propagate (`open_cache` wraps this cache in a
`ResilientCache`, which makes an outage a miss); a payload that is not a record is treated as a miss.
Socket timeouts are short (250 ms, ``?socket_timeout=S`` in the URL overrides) and a failed command
is not retried here, so a hung Redis costs a request at most one timeout. `open_cache` does not need
Redis up (``ping=False``, then one probe through the breaker): a server started while Redis is down
serves uncached, reports the cache degraded and uses Redis once it answers; the roll subscription
keeps trying in the background meanwhile.
"""

from __future__ import annotations

import logging
import re
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from grinfer.storage.base import Event, UserRecord
from grinfer.storage.memory import check_ttl

log = logging.getLogger("grinfer.storage")
DEFAULT_PREFIX = "grinfer:"
DEFAULT_SOCKET_TIMEOUT_S = 0.25
EPOCH_TTL_S = 7 * 86400  # a user's write epoch outlives every record tagged with it
MAX_RECORD_TTL_S = 86400
MAX_SEEN_PER_THREAD = 1024  # misses remembered per thread awaiting their put (unknown users are never put)
_MAGIC = b"GRU1"
_HEADER = struct.Struct("<4sqIII")
# Stores each record as b"<epoch>:" + its encoding: the epoch its reader saw, or (no miss seen, tag "")
# the current one, read in the same script so that a batch stays one round trip.
_PUT_TAGGED = """
for i = 1, #KEYS / 2 do
  local tag = ARGV[2 * i]
  if tag == '' then tag = redis.call('GET', KEYS[2 * i]) or '0' end
  redis.call('SET', KEYS[2 * i - 1], tag .. ':' .. ARGV[2 * i + 1], 'PX', ARGV[1])
end
"""


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


def _listen(pubsub, handlers: dict[str, Callable], outage: Callable) -> Callable[[], None]:
    """Subscribe `pubsub` to `handlers` and listen in its own thread; while Redis is down (at start) a background
    thread keeps trying (`outage` logs and waits a second). Returns the function that stops listening."""
    stopped, listening = threading.Event(), []  # the pubsub's listener thread, once subscribed

    def subscribe() -> bool:
        try:
            pubsub.subscribe(**handlers)
        except redis.RedisError as exc:
            outage(exc, pubsub, None)
            return False
        listening.append(pubsub.run_in_thread(sleep_time=0.5, daemon=True, exception_handler=outage))
        return True

    def keep_trying() -> None:
        while not stopped.is_set() and not subscribe():
            pass

    retrying = None
    if not subscribe():
        retrying = threading.Thread(target=keep_trying, name="grinfer-roll-subscribe", daemon=True)
        retrying.start()

    def stop() -> None:
        stopped.set()
        if retrying is not None:
            retrying.join(timeout=2.0)
        for thread in listening:
            thread.stop()
            thread.join(timeout=2.0)
    return stop


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
        ping: bool = True,
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
        self._redis_url, self._client_name = redis_url, client_name
        self._lock = threading.Lock()
        self._seen = threading.local()  # per thread: {user: write epoch seen at its last miss}
        self._put_tagged = self._client.register_script(_PUT_TAGGED)
        self._hits = self._misses = self._round_trips = 0
        if ping:  # fail at start, with redis-py's message, if unreachable
            self.ping()

    def ping(self) -> bool:
        """One round trip; raises redis-py's error when Redis is unreachable."""
        return bool(self._round_trip(self._client.ping))

    def _round_trip(self, fn, *args, **kwargs) -> Any:  # the sync client: values, not awaitables
        with self._lock:
            self._round_trips += 1
        return fn(*args, **kwargs)

    def _count(self, hits: int, misses: int) -> None:
        with self._lock:
            self._hits += hits
            self._misses += misses

    def _user_key(self, user: str) -> str:
        return f"{self.prefix}u:{user}"

    def _epoch_key(self, user: str) -> str:
        return f"{self.prefix}w:{user}"

    @property
    def rolls_channel(self) -> str:
        return f"{self.prefix}rolls"

    def _seen_epochs(self) -> OrderedDict[str, bytes]:
        seen = getattr(self._seen, "epochs", None)
        if seen is None:
            seen = self._seen.epochs = OrderedDict()
        return seen

    def _result_key(self, key: str) -> str:
        return f"{self.prefix}r:{key}"

    @staticmethod
    def _px(ttl_s: float) -> int:
        return max(1, round(min(check_ttl(ttl_s), MAX_RECORD_TTL_S) * 1000))

    # -- FeatureCache ----------------------------------------------------------------------------

    def get_user(self, user: str) -> UserRecord | None:
        return self.get_users([user])[0]

    def put_user(self, record: UserRecord, ttl_s: float) -> None:
        self.put_users([record], ttl_s)

    def get_users(self, users: Iterable[str]) -> list[UserRecord | None]:
        """Many users (records and write epochs) in one MGET, in the order asked (None for each miss, and for
        a record stored under an older epoch: another replica wrote since)."""
        users = list(users)
        if not users:
            return []
        values = self._round_trip(self._client.mget, [self._user_key(u) for u in users]
                                  + [self._epoch_key(u) for u in users])
        seen, out = self._seen_epochs(), []  # epochs kept as Redis returns them (decimal bytes)
        for user, payload, epoch in zip(users, values[:len(users)], values[len(users):]):
            epoch = epoch or b"0"
            tag, _, body = (payload or b"").partition(b":")
            record = decode_user(user, body) if tag == epoch else None
            if record is None:
                seen[user] = epoch
                seen.move_to_end(user)
                if len(seen) > MAX_SEEN_PER_THREAD:
                    seen.popitem(last=False)
            out.append(record)
        hits = sum(r is not None for r in out)
        self._count(hits, len(out) - hits)
        return out

    def put_users(self, records: Iterable[UserRecord], ttl_s: float) -> None:
        """Many records in one pipelined round trip, all with the same TTL, each tagged with the write epoch
        this thread saw when it missed the user (so a record read before another replica's write stays unused;
        a record put without a miss first is tagged with the current epoch)."""
        seen, keys = self._seen_epochs(), []
        args: list[int | bytes] = [self._px(ttl_s)]
        for record in records:
            keys += (self._user_key(record.user), self._epoch_key(record.user))
            args += (seen.pop(record.user, b""), encode_user(record))
        if keys:
            self._round_trip(self._put_tagged, keys=keys, args=args)

    def invalidate_user(self, user: str) -> None:
        """Drop the record and bump the user's write epoch (one transaction): no replica serves or re-caches
        a copy read before this call."""
        pipe = self._client.pipeline(transaction=True)
        pipe.delete(self._user_key(user))
        pipe.incr(self._epoch_key(user))
        pipe.expire(self._epoch_key(user), EPOCH_TTL_S)
        self._round_trip(pipe.execute)

    # -- fleet-wide roll announcements -----------------------------------------------------------

    def publish_roll(self, user: str, history_version: int) -> None:
        """Announce that `user`'s history rolled to `history_version` (every subscribed replica hears it)."""
        self._round_trip(self._client.publish, self.rolls_channel, f"{history_version} {user}")

    def subscribe_rolls(self, on_roll: Callable[[str, int], None]) -> Callable[[], None]:
        """Call on_roll(user, history_version) for every announced roll, from a background thread, until the
        returned function is called. A Redis outage is logged once; the subscription resumes when it is back."""
        client = redis.Redis.from_url(self._redis_url, socket_connect_timeout=DEFAULT_SOCKET_TIMEOUT_S,
                                      client_name=self._client_name, health_check_interval=10)
        pubsub = client.pubsub(ignore_subscribe_messages=True)

        failing = threading.Event()

        def handle(message) -> None:
            failing.clear()  # hearing again: the next outage is logged again
            version, _, user = message["data"].decode().partition(" ")
            if version.lstrip("-").isdigit() and user:
                on_roll(user, int(version))

        def outage(exc: BaseException, _pubsub, _thread) -> None:
            if not failing.is_set():
                log.warning("roll announcements: %s unreachable (%s); retrying every second", self, exc)
                failing.set()
            time.sleep(1.0)

        stop_listening = _listen(pubsub, {self.rolls_channel: handle}, outage)

        def stop() -> None:
            stop_listening()
            pubsub.close()
            client.close()
        return stop

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
