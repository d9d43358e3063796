"""Storage: the UserStore / Catalog / FeatureCache protocols (see `base`) and their implementations,
picked by URL.

Stores (`open_store`), each one object that is both a UserStore and a Catalog:

- ``sqlite:///abs/path.db``, ``sqlite://relative/path.db``, ``sqlite:///~/in/home.db`` or a bare
  file path: `SQLiteStore` (the default). Everything after ``sqlite://`` is the path, except that
  ``/~`` starts a home-relative path and ``sqlite:////abs`` (SQLAlchemy's form) is ``/abs`` too;
  missing parent directories are created.
- ``postgresql://user@host:5432/db`` or ``postgres://…``, optionally ``?schema=NAME&pool_min=1&
  pool_max=10``: `PostgresStore`.

Caches (`open_cache`), each a FeatureCache:

- ``memory://`` or ``memory://?max_entries=N``: `MemoryFeatureCache` (the default).
- ``redis://host:6379/0`` or ``rediss://…``, optionally ``?prefix=grinfer:&socket_timeout=0.25``:
  `RedisFeatureCache` in a `ResilientCache` (an outage of Redis degrades to uncached serving).

Both stores also offer ``import_users(records)`` for bulk loading (used by `import_dataset`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable
from urllib.parse import parse_qsl, urlsplit

from grinfer.storage.base import Catalog, Event, FeatureCache, UserRecord, UserStore
from grinfer.storage.importer import import_dataset
from grinfer.storage.memory import MemoryFeatureCache
from grinfer.storage.sqlite import SQLiteStore

STORE_SCHEMES = ("sqlite", "postgresql", "postgres")
CACHE_SCHEMES = ("memory", "redis", "rediss")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class Store(UserStore, Catalog, Protocol):
    """What `open_store` returns: a UserStore that is also the Catalog."""


@runtime_checkable
class BulkUserStore(Protocol):
    def import_users(self, records: Iterable[UserRecord]) -> int:
        """Create new users (profile, version, S and R as given) in one transaction; returns the events written."""
        ...


def open_store(url: str | Path) -> Store:
    """Open the UserStore + Catalog named by `url` (see the module docstring for the formats).

    Opening applies any pending schema migrations. Raises ValueError for an unsupported URL.
    """
    if isinstance(url, Path):
        return SQLiteStore(url)
    match = _SCHEME.match(url)
    if match is None:
        if not url.strip():
            raise ValueError("store URL is empty; expected sqlite:///path.db, a file path or postgresql://…")
        return SQLiteStore(url)
    scheme = match.group(1).lower()
    if scheme == "sqlite":
        path, _, query = url[match.end() :].partition("?")
        if query:
            raise ValueError(f"store URL {_redact(url)!r}: sqlite:// takes no query parameters, got {query!r}")
        if not path:
            raise ValueError(f"store URL {_redact(url)!r} has no path; expected sqlite:///path/to/file.db")
        return SQLiteStore(_sqlite_path(path))
    if scheme in ("postgresql", "postgres"):
        from grinfer.storage.postgres import PostgresStore

        return PostgresStore(url)
    raise ValueError(
        f"unsupported store URL {_redact(url)!r}: expected one of {', '.join(s + '://' for s in STORE_SCHEMES)} "
        "or a file path"
    )


def open_cache(url: str) -> FeatureCache:
    """Open the FeatureCache named by `url` (``memory://…`` or ``redis://…``); ValueError if unsupported."""
    match = _SCHEME.match(url)
    scheme = match.group(1).lower() if match else None
    if scheme == "memory":
        parts = urlsplit(url)
        if parts.netloc or parts.path not in ("", "/"):
            raise ValueError(f"cache URL {url!r}: memory:// takes only query parameters (memory://?max_entries=N)")
        kwargs = {}
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key != "max_entries":
                raise ValueError(f"cache URL {url!r}: unknown parameter {key!r} (memory:// accepts max_entries)")
            try:
                kwargs["max_entries"] = int(value)
            except ValueError:
                raise ValueError(f"cache URL {url!r}: max_entries must be an integer, got {value!r}") from None
        return MemoryFeatureCache(**kwargs)
    if scheme in ("redis", "rediss"):
        from grinfer.storage.redis_cache import RedisFeatureCache
        from grinfer.storage.resilient import ResilientCache

        cache = ResilientCache(RedisFeatureCache(url, ping=False))
        cache.ping()  # Redis down at start: the server starts degraded (uncached) and uses Redis once it is up
        return cache
    raise ValueError(
        f"unsupported cache URL {_redact(url)!r}: expected one of {', '.join(s + '://' for s in CACHE_SCHEMES)}"
    )


def _sqlite_path(path: str) -> str:
    """``/~/x`` means ``~/x`` (home) and ``//abs`` means ``/abs`` (SQLAlchemy's four-slash form)."""
    if re.match(r"^/+~", path):
        return path.lstrip("/")
    return re.sub(r"^/{2,}", "/", path)


def _redact(url: str) -> str:
    """The URL with any password replaced by ***, for error messages."""
    return re.sub(r"(://[^/:@]*:)[^/@]*@", r"\1***@", url)


__all__ = [
    "CACHE_SCHEMES",
    "STORE_SCHEMES",
    "BulkUserStore",
    "Catalog",
    "Event",
    "FeatureCache",
    "MemoryFeatureCache",
    "SQLiteStore",
    "Store",
    "UserRecord",
    "UserStore",
    "import_dataset",
    "open_cache",
    "open_store",
]
