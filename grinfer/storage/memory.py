"""MemoryFeatureCache: the in-process FeatureCache (the default): a dict with TTLs and an LRU size bound.

Entries (user records and result blobs together) expire ``ttl_s`` seconds after they were put
(monotonic clock; expired entries are dropped when touched or evicted), and when ``max_entries`` is
reached the least recently used entry goes. Records are copied on the way in and out, so callers may
mutate what they get back. All methods are thread-safe (one lock).
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable

from grinfer.storage.base import UserRecord

DEFAULT_MAX_ENTRIES = 100_000


def check_ttl(ttl_s: float) -> float:
    ttl_s = float(ttl_s)
    if not (ttl_s > 0 and math.isfinite(ttl_s)):
        raise ValueError(f"ttl_s must be a positive finite number of seconds, got {ttl_s}")
    return ttl_s


def copy_record(record: UserRecord) -> UserRecord:
    """A copy sharing nothing mutable with `record` (Events are frozen, so the lists are enough)."""
    return UserRecord(
        user=record.user,
        profile=list(record.profile),
        history_version=record.history_version,
        static=list(record.static),
        realtime=list(record.realtime),
    )


class MemoryFeatureCache:
    """FeatureCache in this process's memory."""

    in_process = True

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self._data: OrderedDict[tuple[str, str], tuple[float, object]] = OrderedDict()  # key -> (expiry, value)
        self._lock = threading.Lock()
        self._hits = self._misses = self._evictions = 0

    # -- generic entries -----------------------------------------------------------------------

    def _get(self, key: tuple[str, str]) -> object | None:
        now = time.monotonic()
        entry = self._data.get(key)
        if entry is not None and entry[0] > now:
            self._data.move_to_end(key)
            self._hits += 1
            return entry[1]
        if entry is not None:
            del self._data[key]
        self._misses += 1
        return None

    def _put(self, key: tuple[str, str], value: object, ttl_s: float) -> None:
        self._data[key] = (time.monotonic() + ttl_s, value)
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)
            self._evictions += 1

    # -- FeatureCache ----------------------------------------------------------------------------

    def get_user(self, user: str) -> UserRecord | None:
        with self._lock:
            record = self._get(("u", user))
        return None if record is None else copy_record(record)  # type: ignore[arg-type]

    def put_user(self, record: UserRecord, ttl_s: float) -> None:
        ttl_s, copy = check_ttl(ttl_s), copy_record(record)
        with self._lock:
            self._put(("u", record.user), copy, ttl_s)

    def get_users(self, users: Iterable[str]) -> list[UserRecord | None]:
        """Many users at once, in the order asked (None for each miss)."""
        with self._lock:
            found = [self._get(("u", u)) for u in users]
        return [None if r is None else copy_record(r) for r in found]  # type: ignore[arg-type]

    def put_users(self, records: Iterable[UserRecord], ttl_s: float) -> None:
        """Many records at once, all with the same TTL."""
        ttl_s = check_ttl(ttl_s)
        copies = [copy_record(r) for r in records]
        with self._lock:
            for r in copies:
                self._put(("u", r.user), r, ttl_s)

    def invalidate_user(self, user: str) -> None:
        with self._lock:
            self._data.pop(("u", user), None)

    def get_result(self, key: str) -> bytes | None:
        with self._lock:
            return self._get(("r", key))  # type: ignore[return-value]

    def put_result(self, key: str, value: bytes, ttl_s: float) -> None:
        ttl_s, value = check_ttl(ttl_s), bytes(value)
        with self._lock:
            self._put(("r", key), value, ttl_s)

    # -- housekeeping ----------------------------------------------------------------------------

    def clear(self) -> None:
        """Drop every entry."""
        with self._lock:
            self._data.clear()

    def stats(self) -> dict[str, int]:
        """Counters since creation: hits, misses, evictions, and entries held now (expired included)."""
        with self._lock:
            counts = {"hits": self._hits, "misses": self._misses, "evictions": self._evictions}
            return {**counts, "entries": len(self._data)}

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    def close(self) -> None:
        self.clear()

    def __repr__(self) -> str:
        return f"MemoryFeatureCache(max_entries={self.max_entries})"
