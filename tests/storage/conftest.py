"""Fixtures for the storage tests: real PostgreSQL and Redis, each test isolated.

PostgreSQL tests get a fresh schema (dropped afterwards) through the store URL's ``schema``
parameter; Redis tests get a unique key prefix (its keys deleted afterwards). If a service is
unreachable the tests that need it fail, unless GRINFER_SKIP_SERVICES=1 asks to skip them.
Override the servers with GRINFER_TEST_POSTGRES_URL / GRINFER_TEST_REDIS_URL.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from psycopg import sql

from grinfer.storage import open_cache, open_store

POSTGRES_URL = os.environ.get("GRINFER_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("GRINFER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _unavailable(service: str, url: str, error: Exception) -> None:
    message = f"{service} is unreachable at {url}: {error}"
    if os.environ.get("GRINFER_SKIP_SERVICES") == "1":
        pytest.skip(f"{message} (GRINFER_SKIP_SERVICES=1)")
    pytest.fail(f"{message}\nStart it, or set GRINFER_SKIP_SERVICES=1 to skip the tests that need it.", pytrace=False)


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """The server's URL, once it is known to answer."""
    error = None
    try:
        with psycopg.connect(POSTGRES_URL, connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as e:
        error = e
    if error is not None:
        _unavailable("PostgreSQL", POSTGRES_URL, error)
    return POSTGRES_URL


@pytest.fixture(scope="session")
def redis_url() -> str:
    error = None
    try:
        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=5)
        client.ping()
        client.close()
    except redis.RedisError as e:
        error = e
    if error is not None:
        _unavailable("Redis", REDIS_URL, error)
    return REDIS_URL


def with_param(url: str, key: str, value: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}{key}={value}"


@pytest.fixture
def pg_store_url(postgres_url: str) -> Iterator[str]:
    """A store URL with its own schema (created by the store on open, dropped after the test)."""
    schema = f"t_{uuid.uuid4().hex[:20]}"
    yield with_param(postgres_url, "schema", schema)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite://{tmp_path}/store.db"
    return request.getfixturevalue("pg_store_url")


@pytest.fixture
def store(store_url: str):
    s = open_store(store_url)
    yield s
    s.close()


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A unique key prefix; every key under it is deleted after the test."""
    prefix = f"grinfer-test:{uuid.uuid4().hex}:"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(params=["memory", "redis"])
def cache_url(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory://?max_entries=1000"
    return with_param(request.getfixturevalue("redis_url"), "prefix", request.getfixturevalue("redis_prefix"))


@pytest.fixture
def cache(cache_url: str):
    c = open_cache(cache_url)
    yield c
    c.close()
