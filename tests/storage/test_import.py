"""import_dataset into SQLite and PostgreSQL, and the URL parsing of open_store / open_cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from grinfer.data import generate_synthetic
from grinfer.storage import MemoryFeatureCache, SQLiteStore, import_dataset, open_cache, open_store
from grinfer.storage.base import Event, Roll, UserRecord
from grinfer.storage.postgres import PostgresStore, parse_postgres_url
from grinfer.storage.redis_cache import parse_redis_url


@pytest.fixture(scope="module")
def dataset():
    return generate_synthetic(num_users=120, num_items=200, mean_events=25, seed=7)


def expected_events(user) -> list[Event]:
    return [Event(int(i), int(t), int(a)) for i, t, a in zip(user.items, user.timestamps, user.ratings)]


def test_import_synthetic(store, dataset):
    counts = import_dataset(dataset, store, batch_size=500, progress=False)
    assert counts == {"users": 120, "events": dataset.num_events, "items": 200}
    assert store.count_users() == 120
    assert store.list_users(limit=3) == ["1", "2", "3"]

    user = dataset.users[17]
    got = store.get_user(str(user.user_id))
    assert got.profile == user.profile.tolist()
    assert got.history_version == 1  # everything imported is static history
    assert got.realtime == []
    assert got.static == expected_events(user)  # time order, ties in dataset order
    assert any(np.diff(user.timestamps) == 0)  # the synthetic data does have ties

    catalog = store.load_catalog()
    np.testing.assert_array_equal(catalog.genres, dataset.catalog.genres)
    assert catalog.titles == dataset.catalog.titles

    # later events are real-time until the next roll
    assert store.append_events(got.user, [Event(1, 2_000_000_000, 5)]) == 1
    assert store.roll_history(got.user).history_version == 2

    with pytest.raises(ValueError, match="already exist"):
        import_dataset(dataset, store, progress=False)
    assert store.count_users() == 120


def test_import_users_writes_records_as_given(store):
    records = [
        UserRecord("a", [1, 2], 3, static=[Event(1, 10, 1), Event(2, 10, 2)], realtime=[Event(3, 5, 3)]),
        UserRecord("b", [], 0),
        UserRecord("c", [4], 1, static=[Event(9, 1, 1)]),
    ]
    assert store.import_users(records) == 4
    for r in records:
        assert store.get_user(r.user) == r
    with pytest.raises(ValueError, match="twice"):
        store.import_users([UserRecord("d", []), UserRecord("d", [])])
    with pytest.raises(ValueError, match="'a'"):
        store.import_users([UserRecord("e", []), UserRecord("a", [])])
    assert store.get_user("e") is None  # the failed batch wrote nothing
    assert store.roll_history("a") == Roll(4, 1)
    assert [e.item for e in store.get_user("a").static] == [3, 1, 2]


class _NoBulk:
    """A real store seen through only the UserStore + Catalog protocols (no import_users)."""

    def __init__(self, store):
        self._s = store

    def __getattr__(self, name):
        if name == "import_users":
            raise AttributeError(name)
        return getattr(self._s, name)


def test_import_without_bulk_method_gives_same_result(tmp_path, dataset):
    small = generate_synthetic(num_users=15, num_items=50, mean_events=8, seed=3)
    with open_store(tmp_path / "bulk.db") as a, open_store(tmp_path / "plain.db") as b:
        assert import_dataset(small, a, batch_size=40, progress=False) == import_dataset(
            small, _NoBulk(b), batch_size=40, progress=False
        )
        for user in a.list_users():
            assert a.get_user(user) == b.get_user(user)


def test_import_rejects_bad_batch_size(tmp_path, dataset):
    with open_store(tmp_path / "x.db") as s, pytest.raises(ValueError, match="batch_size"):
        import_dataset(dataset, s, batch_size=0)


# -- URL parsing -----------------------------------------------------------------------------------


def test_open_store_sqlite_urls(tmp_path, monkeypatch):
    absolute = tmp_path / "abs.db"
    with open_store(f"sqlite://{absolute}") as s:  # sqlite:///abs/path
        assert isinstance(s, SQLiteStore) and s.path == absolute
        s.put_profile("x", [1])
    with open_store(str(absolute)) as s:  # a bare path is the same file
        assert s.get_user("x").profile == [1]
    with open_store(absolute) as s:  # and so is a Path
        assert s.count_users() == 1
    with open_store(f"sqlite:///{absolute}") as s:  # SQLAlchemy's four slashes
        assert s.path == absolute and s.count_users() == 1
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with open_store("sqlite:///~/dir/h.db") as s:  # home-relative
        assert s.path == tmp_path / "home/dir/h.db"
    assert (tmp_path / "home/dir/h.db").is_file()
    monkeypatch.chdir(tmp_path)
    with open_store("sqlite://sub/dir/rel.db") as s:  # relative to the working directory, dirs created
        assert s.path == Path("sub/dir/rel.db")
    assert (tmp_path / "sub/dir/rel.db").is_file()


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("mysql://u@h/db", r"unsupported store URL 'mysql://u@h/db'.*sqlite://, postgresql://, postgres://"),
        ("redis://localhost:6379/0", "unsupported store URL"),
        ("ftp://user:secret@host/x", r"'ftp://user:\*\*\*@host/x'"),  # the password is not echoed
        ("sqlite://", "has no path"),
        ("sqlite:///tmp/x.db?mode=ro", "no query parameters"),
        ("", "empty"),
    ],
)
def test_open_store_rejects(url, match):
    with pytest.raises(ValueError, match=match):
        open_store(url)


def test_open_store_postgres_urls(pg_store_url):
    alias = pg_store_url.replace("postgresql://", "postgres://", 1)
    with open_store(pg_store_url) as a, open_store(alias + "&pool_min=0&pool_max=2") as b:
        assert isinstance(a, PostgresStore) and isinstance(b, PostgresStore)
        a.put_profile("shared", [7])
        assert b.get_user("shared").profile == [7]  # same schema


def test_parse_postgres_url():
    url = "postgresql://me:pw@db:5432/grinfer?sslmode=disable&schema=tenant_1&pool_max=4&application_name=x"
    conninfo, params = parse_postgres_url(url)
    assert conninfo == "postgresql://me:pw@db:5432/grinfer?sslmode=disable&application_name=x"
    assert params == {"schema": "tenant_1", "pool_max": "4"}
    with pytest.raises(ValueError, match="lowercase identifier"):
        PostgresStore("postgresql://nobody@127.0.0.1:1/x?schema=Bad-Name")
    with pytest.raises(ValueError, match="pool_max must be an integer"):
        PostgresStore("postgresql://nobody@127.0.0.1:1/x?pool_max=many")


def test_open_cache_memory_urls():
    assert isinstance(open_cache("memory://"), MemoryFeatureCache)
    cache = open_cache("memory://?max_entries=5")
    assert isinstance(cache, MemoryFeatureCache) and cache.max_entries == 5
    for url, match in [
        ("memory://?size=5", "unknown parameter 'size'"),
        ("memory://?max_entries=lots", "must be an integer"),
        ("memory://somewhere", "only query parameters"),
        ("memcached://h:11211", r"unsupported cache URL 'memcached://h:11211'.*memory://, redis://, rediss://"),
        ("sqlite:///x.db", "unsupported cache URL"),
        ("", "unsupported cache URL"),
    ]:
        with pytest.raises(ValueError, match=match):
            open_cache(url)


def test_parse_redis_url():
    assert parse_redis_url("redis://h:6380/2") == ("redis://h:6380/2", "grinfer:")
    assert parse_redis_url("rediss://:pw@h:6380/2?prefix=app:&socket_keepalive=true") == (
        "rediss://:pw@h:6380/2?socket_keepalive=true",
        "app:",
    )
    with pytest.raises(ValueError, match="not a Redis URL"):
        parse_redis_url("memory://")
