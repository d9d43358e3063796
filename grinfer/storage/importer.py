"""Load a Dataset (MovieLens or synthetic) into a store: the catalogue and every user's profile + events."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from tqdm import tqdm

from grinfer.data.types import Dataset, UserTimeline
from grinfer.storage.base import Event, UserRecord

if TYPE_CHECKING:
    from grinfer.storage import Store

DEFAULT_BATCH_SIZE = 50_000


def import_dataset(
    ds: Dataset, store: Store, batch_size: int = DEFAULT_BATCH_SIZE, *, progress: bool = True
) -> dict[str, int]:
    """Write `ds` into `store`; returns ``{"users": …, "events": …, "items": …}`` (counts written).

    The catalogue replaces the stored one (`put_catalog`). Each user gets id ``str(user.user_id)``,
    its profile, and all of its events in time order (ties keep the dataset's order).

    MovieLens convention: every imported event is *static history*. A user's events are appended
    and then rolled once, so after the import each user has ``history_version == 1``, S = all of
    its events and an empty R; events posted later become R until the next roll.

    Users go in batches of about `batch_size` events (a user is never split), one transaction per
    batch, through the store's bulk ``import_users`` when it has one (SQLiteStore and
    PostgresStore do) and otherwise `put_profile` + `append_events` + `roll_history` per user.
    Users must not exist in the store yet (bulk path: ValueError naming them, that batch unwritten).
    `progress` shows a tqdm bar counting events.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    store.put_catalog(ds.catalog)
    bulk = getattr(store, "import_users", None)
    users = events = 0
    with tqdm(total=ds.num_events, unit="event", desc=f"import {ds.name}", disable=not progress) as bar:
        for batch in _batches(ds.users, batch_size):
            records = [_record(u) for u in batch]
            if bulk is not None:
                written = bulk(records)
            else:
                written = 0
                for r in records:
                    store.put_profile(r.user, r.profile)
                    store.append_events(r.user, r.static)
                    store.roll_history(r.user)
                    written += len(r.static)
            users += len(records)
            events += written
            bar.update(written)
    return {"users": users, "events": events, "items": ds.catalog.num_items}


def _record(user: UserTimeline) -> UserRecord:
    events = list(map(Event, user.items.tolist(), user.timestamps.tolist(), user.ratings.tolist()))
    return UserRecord(
        user=str(user.user_id), profile=[int(v) for v in user.profile.tolist()], history_version=1, static=events
    )


def _batches(users: list[UserTimeline], batch_size: int) -> Iterator[list[UserTimeline]]:
    batch: list[UserTimeline] = []
    size = 0
    for user in users:
        if batch and size + len(user) > batch_size:
            yield batch
            batch, size = [], 0
        batch.append(user)
        size += len(user)
    if batch:
        yield batch
