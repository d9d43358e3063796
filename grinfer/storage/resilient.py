"""Surviving a dependency outage: a circuit breaker, and a FeatureCache that degrades to "no cache".

`Breaker` keeps a failing dependency from being waited on by every request: the first failure opens
it (one log line), calls are then refused at once for `cooldown_s`, after which a single trial call
goes through; its success closes the breaker (one log line), its failure opens it again.

`ResilientCache` wraps a remote FeatureCache (Redis): while the cache fails or hangs (its own short
socket timeouts bound each try) lookups are misses and writes are dropped, so requests are served
from the store uncached. Invalidations that could not be sent are replayed (or, past a bound, the
whole cache is cleared) before the cache is read again, so no record made stale meanwhile is served.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

from grinfer.storage.base import FeatureCache, UserRecord

log = logging.getLogger("grinfer.storage")
MAX_PENDING_INVALIDATIONS = 10_000


class Breaker:
    """A thread-safe circuit breaker for one dependency (`name` is used in its log lines)."""

    def __init__(self, name: str, cooldown_s: float = 1.0, consequence: str = "") -> None:
        self.name, self.cooldown_s, self.consequence = name, cooldown_s, consequence
        self._lock = threading.Lock()
        self._open = self._trial = False
        self._retry_at = 0.0
        self.errors = 0
        self.last_error = ""

    def allow(self) -> bool:
        """Whether a call may try the dependency now (closed, or the one trial once the cooldown is over)."""
        with self._lock:
            if not self._open:
                return True
            if self._trial or time.monotonic() < self._retry_at:
                return False
            self._trial = True
            return True

    def success(self) -> None:
        with self._lock:
            recovered, self._open, self._trial = self._open, False, False
        if recovered:
            log.warning("%s is back: using it again", self.name)

    def failure(self, exc: BaseException) -> None:
        with self._lock:
            opened = not self._open
            self.errors += 1
            self.last_error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            self._open, self._trial = True, False
            self._retry_at = time.monotonic() + self.cooldown_s
        if opened:
            log.warning("%s degraded (%s)%s; retrying every %.1f s", self.name, self.last_error,
                        self.consequence, self.cooldown_s)

    @property
    def degraded(self) -> bool:
        with self._lock:
            return self._open

    def health(self) -> dict:
        """{"degraded", "errors" (failures since start), "last_error"} for /readyz and the metrics."""
        with self._lock:
            return {"degraded": self._open, "errors": self.errors, "last_error": self.last_error}


def health_of(component: object) -> dict:
    """A store's or cache's `health()`, or a healthy default for one that has no breaker (SQLite, memory)."""
    health = getattr(component, "health", None)
    return health() if health is not None else {"degraded": False, "errors": 0, "last_error": ""}


class ResilientCache:
    """A FeatureCache whose outages are misses (see the module docstring). `inner.errors` names its I/O errors."""

    def __init__(self, inner: FeatureCache, cooldown_s: float = 1.0) -> None:
        self.inner = inner
        self.in_process = inner.in_process
        self._errors: tuple[type[BaseException], ...] = inner.errors  # type: ignore[attr-defined]
        self.breaker = Breaker(f"cache {inner!r}", cooldown_s, ": serving from the store uncached")
        self._pending: set[str] = set()  # users whose invalidation could not be sent
        self._overflowed = False  # more than MAX_PENDING_INVALIDATIONS: clear everything instead
        self._pending_lock = threading.Lock()

    def _call(self, default, fn: Callable, *args):
        """fn(*args) through the breaker; `default` when the cache is degraded or fails."""
        if not self.breaker.allow():
            return default
        try:
            self._replay_invalidations()
            out = fn(*args)
        except self._errors as exc:
            self.breaker.failure(exc)
            return default
        self.breaker.success()
        return out

    def _replay_invalidations(self) -> None:
        with self._pending_lock:
            users, overflowed = list(self._pending), self._overflowed
        if not users and not overflowed:
            return
        if overflowed:
            self.inner.clear()  # type: ignore[attr-defined]
        else:
            for user in users:
                self.inner.invalidate_user(user)
        with self._pending_lock:
            self._pending.difference_update(users)
            self._overflowed = self._overflowed and not overflowed

    def _remember_invalidation(self, user: str) -> None:
        with self._pending_lock:
            if len(self._pending) < MAX_PENDING_INVALIDATIONS:
                self._pending.add(user)
            else:
                self._overflowed = True

    # -- FeatureCache ----------------------------------------------------------------------------

    def get_user(self, user: str) -> UserRecord | None:
        return self._call(None, self.inner.get_user, user)

    def put_user(self, record: UserRecord, ttl_s: float) -> None:
        self._call(None, self.inner.put_user, record, ttl_s)

    def get_users(self, users: Iterable[str]) -> list[UserRecord | None]:
        users = list(users)
        return self._call([None] * len(users), self.inner.get_users, users)  # type: ignore[attr-defined]

    def put_users(self, records: Iterable[UserRecord], ttl_s: float) -> None:
        self._call(None, self.inner.put_users, list(records), ttl_s)  # type: ignore[attr-defined]

    def invalidate_user(self, user: str) -> None:
        if self._call(False, lambda: self.inner.invalidate_user(user) or True) is False:
            self._remember_invalidation(user)

    def get_result(self, key: str) -> bytes | None:
        return self._call(None, self.inner.get_result, key)

    def put_result(self, key: str, value: bytes, ttl_s: float) -> None:
        self._call(None, self.inner.put_result, key, value, ttl_s)

    def ping(self) -> bool:
        """One round trip to the cache (`inner.ping`) through the breaker: False (and degraded) when it fails.
        At start (`open_cache`), and from the readiness probe while degraded, so an idle server notices too."""
        return self._call(False, self.inner.ping)  # type: ignore[attr-defined]

    def health(self) -> dict:
        return self.breaker.health()

    def __getattr__(self, name: str):
        """Housekeeping (keys, clear, stats, prefix) goes straight to the wrapped cache."""
        return getattr(self.inner, name)

    def close(self) -> None:
        self.inner.close()

    def __repr__(self) -> str:
        return f"ResilientCache({self.inner!r})"
