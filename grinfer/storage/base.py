"""Storage contracts: UserStore (profiles, append-only events, history versions), Catalog (items,
model versions) and FeatureCache (short-lived user and result caching). Implementations are picked
by URL: `sqlite:///path.db` (default), `postgresql://...`, `redis://...`, `memory://`.

A user's events are append-only. Events up to the last history roll form the static history S;
later ones are the real-time events R. Rolling folds R into S and bumps `history_version`, which
is what keys the engine's KV cache; a roll with no R to fold changes nothing (same version).

Every write that changes what `get_user` reads (a profile, an append, a roll that folds) also bumps the user's
`revision`, a counter in the store: a process may keep a record and reuse it while the store still has its
revision (`checked.RevisionCheckedStore`), whichever process wrote since.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from grinfer.data.types import ItemCatalog


@dataclass(frozen=True)
class Event:
    """One behaviour event: internal (dense) item id, unix seconds, action (rating 1..5)."""

    item: int
    ts: int
    action: int


@dataclass(frozen=True)
class Roll:
    """What a history roll did: the history version after it and the real-time events it folded into S."""

    history_version: int
    folded: int


@dataclass(frozen=True)
class Appended:
    """What an append answered: events appended and the user's R length after it; `replayed` when a retry
    with an already-used idempotency key got the first answer back instead of appending again."""

    appended: int
    realtime_events: int
    replayed: bool = False


class Unavailable(RuntimeError):
    """A dependency (the store) or the service cannot answer right now: retry later (503 / UNAVAILABLE)."""


class IdempotencyConflict(ValueError):
    """An idempotency key already used by the user for a different batch of events."""


@dataclass
class UserRecord:
    """Everything the featurizer needs about a user."""

    user: str
    profile: list[int]  # categorical profile values, one per profile field (0 = unknown)
    history_version: int = 0
    static: list[Event] = field(default_factory=list)  # S: events folded in by history rolls, time order
    realtime: list[Event] = field(default_factory=list)  # R: events since the last roll, time order


class UserStore(Protocol):
    """Durable user data. `append_events` returns only after the events are durable."""

    def get_user(self, user: str) -> UserRecord | None: ...

    def get_user_at(self, user: str) -> tuple[UserRecord, int] | None:
        """The record and its revision from one snapshot (None for an unknown user)."""
        ...

    def user_revision(self, user: str) -> int | None:
        """The user's revision now, one indexed lookup (None for an unknown user)."""
        ...

    def put_profile(self, user: str, profile: list[int]) -> None: ...

    def append_events(self, user: str, events: list[Event]) -> int:
        """Append (creating the user with an unknown profile if needed); returns the user's R length."""
        ...

    def append_events_once(self, user: str, events: list[Event], key: str, digest: str) -> Appended:
        """Append unless the user already used `key`: then return that first append's answer, appending nothing
        (IdempotencyConflict if that batch's `digest` differs). The key is stored durably with the events."""
        ...

    def roll_history(self, user: str) -> Roll:
        """Fold R into S and bump the version; with R empty, change nothing (KeyError for an unknown user)."""
        ...

    def count_users(self) -> int: ...

    def list_users(self, limit: int = 100, offset: int = 0) -> list[str]: ...

    def close(self) -> None: ...


class Catalog(Protocol):
    """Items (with side features and titles) and the registered model versions."""

    def put_catalog(self, catalog: ItemCatalog) -> None: ...

    def load_catalog(self) -> ItemCatalog | None: ...

    def register_model(self, name: str, path: str, metadata: dict) -> None: ...

    def list_models(self) -> list[dict]: ...

    def close(self) -> None: ...


class FeatureCache(Protocol):
    """Short-lived caching of user records and results, with TTLs; never the source of truth."""

    in_process: bool  # lookups are answered from this process's memory (no I/O): callers need no thread

    def get_user(self, user: str) -> UserRecord | None: ...

    def put_user(self, record: UserRecord, ttl_s: float) -> None: ...

    def invalidate_user(self, user: str) -> None: ...

    def get_result(self, key: str) -> bytes | None: ...

    def put_result(self, key: str, value: bytes, ttl_s: float) -> None: ...

    def close(self) -> None: ...
