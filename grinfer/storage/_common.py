"""Helpers shared by the SQL stores: catalog checks, record assembly and argument validation."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from grinfer.data.types import ItemCatalog
from grinfer.storage.base import Appended, Event, IdempotencyConflict, UserRecord

log = logging.getLogger("grinfer.storage")
PRUNE_BATCH = 5_000  # idempotency keys deleted per statement (each well inside a statement timeout)


@dataclass(frozen=True)
class CatalogRows:
    """An ItemCatalog checked and flattened into rows for the `items` and `genre_names` tables."""

    items: list[tuple[int, int, str, bytes, int]]  # (dense item, raw id, title, genres multi-hot bytes, year bucket)
    genre_names: list[tuple[int, str]]


def catalog_rows(catalog: ItemCatalog) -> CatalogRows:
    """Validate a catalogue's shapes and turn it into table rows (ValueError naming the mismatch)."""
    genres = np.asarray(catalog.genres)
    n = len(catalog.titles)
    if n < 1:
        raise ValueError("catalog must have at least row 0 (the unknown item)")
    if genres.ndim != 2 or genres.shape != (n, len(catalog.genre_names)):
        raise ValueError(
            f"catalog genres must have shape (len(titles), len(genre_names)) = ({n}, {len(catalog.genre_names)}), "
            f"got {genres.shape}"
        )
    years, raw = np.asarray(catalog.year_bucket), np.asarray(catalog.raw_ids)
    if years.shape != (n,) or raw.shape != (n,):
        raise ValueError(f"catalog year_bucket and raw_ids must have shape ({n},), got {years.shape} and {raw.shape}")
    genres = np.ascontiguousarray(genres, dtype=np.uint8)
    items = [
        (i, r, t, genres[i].tobytes(), y)
        for i, (r, t, y) in enumerate(zip(raw.tolist(), catalog.titles, years.tolist()))
    ]
    return CatalogRows(items=items, genre_names=list(enumerate(catalog.genre_names)))


def catalog_from_rows(items: Sequence[tuple[int, int, str, bytes, int]], genre_names: Sequence[str]) -> ItemCatalog:
    """Rebuild an ItemCatalog from rows ordered by dense item id (as `catalog_rows` wrote them)."""
    if [row[0] for row in items] != list(range(len(items))):
        raise RuntimeError("stored catalog is corrupt: item ids are not the contiguous range 0..n")
    genres = np.frombuffer(b"".join(bytes(row[3]) for row in items), dtype=np.uint8)
    return ItemCatalog(
        genres=genres.reshape(len(items), len(genre_names)).copy(),
        year_bucket=np.array([row[4] for row in items], dtype=np.int64),
        titles=[row[2] for row in items],
        genre_names=list(genre_names),
        raw_ids=np.array([row[1] for row in items], dtype=np.int64),
    )


def build_record(
    user: str, profile: list[int], history_version: int, rolled_upto: int, events: Iterable[tuple[int, int, int, int]]
) -> UserRecord:
    """Split (seq, item, ts, action) rows, already ordered by (ts, seq), into S (seq ≤ rolled_upto) and R."""
    record = UserRecord(user=user, profile=list(profile), history_version=int(history_version))
    for seq, item, ts, action in events:
        (record.static if seq <= rolled_upto else record.realtime).append(Event(item, ts, action))
    return record


def event_tuples(events: Iterable[Event]) -> list[tuple[int, int, int]]:
    """(item, ts, action) ints for each event; TypeError/ValueError if a field is not an integer."""
    return [(int(e.item), int(e.ts), int(e.action)) for e in events]


def check_page(limit: int, offset: int) -> None:
    if limit < 0 or offset < 0:
        raise ValueError(f"limit and offset must be non-negative, got limit={limit}, offset={offset}")


def metadata_json(metadata: dict) -> str:
    try:
        return json.dumps(metadata, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"model metadata must be JSON-serializable: {e}") from None


def check_new_users(records: Sequence[UserRecord]) -> None:
    """An import batch must not name a user twice."""
    seen: set[str] = set()
    for r in records:
        if r.user in seen:
            raise ValueError(f"import_users: user {r.user!r} appears twice in one batch")
        seen.add(r.user)


def existing_users_error(existing: Sequence[str]) -> ValueError:
    shown = ", ".join(repr(u) for u in existing[:5]) + (" ..." if len(existing) > 5 else "")
    return ValueError(f"import_users only creates new users; {len(existing)} already exist in the store: {shown}")


def replay_append(key: str, digest: str, stored_digest: str, appended: int, realtime_events: int) -> Appended:
    """The first answer of an append whose idempotency key is used again (IdempotencyConflict for other events)."""
    if digest != stored_digest:
        raise IdempotencyConflict(f"idempotency key {key!r} was already used for a different batch of events")
    return Appended(appended, realtime_events, replayed=True)


@dataclass(frozen=True)
class KeyRetention:
    """How long, and how many, idempotency keys a SQL store keeps. A retry more than `window_s` after its first
    attempt is a new write; past `max_keys` the oldest keys go first. Pruning runs after a keyed append, at
    most once every `interval_s`."""

    window_s: float = 86_400.0
    max_keys: int = 1_000_000
    interval_s: float = 60.0

    def __post_init__(self) -> None:
        if self.window_s <= 0 or self.max_keys < 1 or self.interval_s < 0:
            raise ValueError(f"idempotency key retention needs window_s > 0, max_keys >= 1 and interval_s >= 0, "
                             f"got {self.window_s}, {self.max_keys} and {self.interval_s}")


class KeyPruning:
    """Calls a store's `prune` after keyed appends when `retention.interval_s` has passed since the last call.

    Pruning is housekeeping: the append it follows is already committed, so a failed prune is logged and
    retried at the next interval, never raised to the writer."""

    def __init__(self, retention: KeyRetention, prune: Callable[[], int]) -> None:
        self.retention, self._prune = retention, prune
        self._next = 0.0
        self._lock = threading.Lock()

    def after_append(self) -> None:
        now = time.monotonic()
        with self._lock:
            if now < self._next:
                return
            self._next = now + self.retention.interval_s
        try:
            pruned = self._prune()
        except Exception as exc:  # any store error: the write it follows has succeeded
            log.warning("pruning idempotency keys failed (next try in %.0f s): %s", self.retention.interval_s, exc)
            return
        if pruned:
            log.info("pruned %d idempotency keys (older than %.0f s or beyond the newest %d)", pruned,
                     self.retention.window_s, self.retention.max_keys)
