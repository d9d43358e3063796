"""RevisionCheckedStore: a store whose user reads are answered from this process's memory while still current.

It keeps up to `max_users` user records (least recently used first out), each with the store revision it was
read at (`get_user_at`: record and revision from one snapshot). A read asks the store for the user's revision
now (`user_revision`, one indexed lookup) and re-reads the whole record only when that changed. Every write
path of the stores bumps the revision in the same transaction as the write, so a write made through any
process or connection is seen by the next read here: unlike a TTL cache this needs no invalidation, and
front-end workers (workers.py) can keep records although another process writes.

Records are copied on the way out: callers may mutate what they get. Everything other than `get_user` is the
wrapped store's own (writes go straight through; they need not touch this cache).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from grinfer.storage.base import UserRecord, UserStore
from grinfer.storage.memory import copy_record
from grinfer.storage.sqlite import SQLiteStore

DEFAULT_MAX_USERS = 20_000


class RevisionCheckedStore:
    """`store` with revision-checked user records kept in this process; thread-safe."""

    def __init__(self, store: UserStore, max_users: int = DEFAULT_MAX_USERS) -> None:
        if max_users < 1:
            raise ValueError(f"max_users must be >= 1, got {max_users}")
        self.store, self.max_users = store, max_users
        # a local file: the revision lookup takes microseconds, so an event loop may run `current` inline
        self.checks_inline = isinstance(store, SQLiteStore)
        self._held: OrderedDict[str, tuple[UserRecord, int]] = OrderedDict()  # user -> (record, revision)
        self._lock = threading.Lock()
        self.hits = self.reads = 0

    def current(self, user: str) -> UserRecord | None:
        """A copy of the held record if the store's revision still matches it (one indexed lookup), else None:
        never reads a whole record."""
        with self._lock:
            held = self._held.get(user)
        if held is None or self.store.user_revision(user) != held[1]:
            return None
        with self._lock:
            self.hits += 1
            if user in self._held:
                self._held.move_to_end(user)
        return copy_record(held[0])

    def get_user(self, user: str) -> UserRecord | None:
        """The user's current record (held, or read whole and kept), or None for an unknown user."""
        record = self.current(user)
        if record is not None:
            return record
        found = self.store.get_user_at(user)
        if found is None:
            return None
        with self._lock:
            self.reads += 1
            held = self._held.get(user)
            if held is None or held[1] <= found[1]:  # a slower read of an older revision never replaces a newer
                self._held[user] = found
                self._held.move_to_end(user)
                while len(self._held) > self.max_users:
                    self._held.popitem(last=False)
        return copy_record(found[0])

    def stats(self) -> dict[str, int]:
        """Reads answered from memory (hits), whole records read from the store, records held now."""
        with self._lock:
            return {"hits": self.hits, "reads": self.reads, "held": len(self._held)}

    def close(self) -> None:
        with self._lock:
            self._held.clear()
        self.store.close()

    def __getattr__(self, name: str):  # the rest of the store's interface (writes, catalogue, registry, health)
        if name == "store":  # not set yet (a half-built object): no recursion
            raise AttributeError(name)
        return getattr(self.store, name)

    def __repr__(self) -> str:
        return f"RevisionCheckedStore({self.store!r}, max_users={self.max_users})"
