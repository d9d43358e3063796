"""FeatureCache: one suite run against MemoryFeatureCache and RedisFeatureCache (a unique key prefix)."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import redis

from grinfer.storage import MemoryFeatureCache, open_cache
from grinfer.storage.base import Event, UserRecord
from grinfer.storage.redis_cache import RedisFeatureCache, decode_user, encode_user


def record(user: str = "u1", n_static: int = 3, n_realtime: int = 2, version: int = 4) -> UserRecord:
    return UserRecord(
        user=user,
        profile=[2, 5, 0, 101],
        history_version=version,
        static=[Event(item=i + 1, ts=956_700_000 + i, action=1 + i % 5) for i in range(n_static)],
        realtime=[Event(item=10_000 + i, ts=2**40 + i, action=5) for i in range(n_realtime)],
    )


def wait_until_gone(get, timeout_s: float = 10.0) -> float:
    """Poll `get` until it returns None; returns the seconds that took (fails after `timeout_s`)."""
    start = time.monotonic()
    while get() is not None:
        if time.monotonic() - start > timeout_s:
            pytest.fail(f"entry still present {timeout_s} s after a short TTL")
        time.sleep(0.02)
    return time.monotonic() - start


def test_user_round_trip(cache):
    assert cache.get_user("u1") is None
    for rec in [record(), record("empty", 0, 0, 0), record("big", 1000, 100), UserRecord("p", profile=[])]:
        cache.put_user(rec, ttl_s=60)
        assert cache.get_user(rec.user) == rec
    rec = record("neg")
    rec.realtime.append(Event(item=0, ts=-5, action=-1))
    cache.put_user(rec, ttl_s=60)
    assert cache.get_user("neg") == rec


def test_records_are_independent_copies(cache):
    rec = record()
    cache.put_user(rec, ttl_s=60)
    rec.realtime.append(Event(1, 2, 3))  # mutate after put
    got = cache.get_user("u1")
    assert got == record()
    got.static.clear()  # mutate what came back
    assert cache.get_user("u1") == record()


def test_put_replaces(cache):
    cache.put_user(record(version=1), ttl_s=60)
    cache.put_user(record(version=2, n_realtime=5), ttl_s=60)
    assert cache.get_user("u1") == record(version=2, n_realtime=5)


def test_ttl_expiry(cache):
    start = time.monotonic()
    cache.put_user(record("short"), ttl_s=0.2)
    cache.put_user(record("long"), ttl_s=60)
    cache.put_result("short", b"r", ttl_s=0.2)
    first = cache.get_user("short")
    if time.monotonic() - start < 0.15:  # only meaningful if the machine was not stalled
        assert first == record("short")
    wait_until_gone(lambda: cache.get_user("short"))
    wait_until_gone(lambda: cache.get_result("short"))
    assert cache.get_user("long") == record("long")


def test_invalid_ttl_is_rejected(cache):
    for ttl in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="ttl_s"):
            cache.put_user(record(), ttl_s=ttl)
        with pytest.raises(ValueError, match="ttl_s"):
            cache.put_result("k", b"v", ttl_s=ttl)


def test_invalidate_user(cache):
    cache.put_user(record("a"), ttl_s=60)
    cache.put_user(record("b"), ttl_s=60)
    cache.put_result("a", b"result of a", ttl_s=60)
    cache.invalidate_user("a")
    cache.invalidate_user("never-cached")  # no error
    assert cache.get_user("a") is None
    assert cache.get_user("b") == record("b")
    assert cache.get_result("a") == b"result of a"  # results live in their own namespace


def test_results_bytes_round_trip(cache):
    assert cache.get_result("k") is None
    blobs = {"k": b"\x00\x01\xff binary\n\x00", "empty": b"", "big": bytes(range(256)) * 4096, "ünï:cödé key": b"x"}
    for key, value in blobs.items():
        cache.put_result(key, value, ttl_s=60)
    for key, value in blobs.items():
        got = cache.get_result(key)
        assert got == value and isinstance(got, bytes)
    cache.put_result("k", b"new", ttl_s=60)
    assert cache.get_result("k") == b"new"


def test_many_users_at_once(cache):
    records = [record(f"m{i}", i % 7, i % 3, i) for i in range(50)]
    cache.put_users(records, ttl_s=60)
    got = cache.get_users(["m0", "missing", *[r.user for r in records[1:]], "m0"])
    assert got == [records[0], None, *records[1:], records[0]]
    assert cache.get_users([]) == []
    cache.put_users([], ttl_s=60)  # no error


def test_stats_count_hits_and_misses(cache):
    before = cache.stats()
    cache.get_user("nope")
    cache.put_user(record(), ttl_s=60)
    cache.get_user("u1")
    after = cache.stats()
    assert after["hits"] - before["hits"] == 1
    assert after["misses"] - before["misses"] == 1


# -- memory-only ---------------------------------------------------------------------------------


def test_memory_cache_is_bounded_lru():
    cache = MemoryFeatureCache(max_entries=3)
    for u in "abc":
        cache.put_user(record(u), ttl_s=60)
    cache.get_user("a")  # a is now the most recently used
    cache.put_result("r", b"x", ttl_s=60)  # evicts b
    assert len(cache) == 3
    assert cache.get_user("b") is None
    assert cache.get_user("a") == record("a")
    assert cache.get_user("c") == record("c")
    assert cache.stats()["evictions"] == 1
    with pytest.raises(ValueError):
        MemoryFeatureCache(max_entries=0)


def test_memory_cache_thread_safe():
    cache = MemoryFeatureCache(max_entries=64)
    errors: list[Exception] = []

    def worker(t: int) -> None:
        try:
            for i in range(300):
                cache.put_user(record(f"{t}-{i % 80}", 2, 1, i), ttl_s=60)
                got = cache.get_user(f"{t}-{(i * 7) % 80}")
                assert got is None or got.user == f"{t}-{(i * 7) % 80}"
                cache.invalidate_user(f"{t}-{i % 5}")
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert len(cache) <= 64


# -- redis-only ----------------------------------------------------------------------------------


def test_codec_round_trip_and_rejects_garbage():
    rec = record("x", 5, 5)
    assert decode_user("x", encode_user(rec)) == rec
    assert len(encode_user(rec)) == 24 + 8 * (4 + 30)
    assert decode_user("x", b"") is None
    assert decode_user("x", b"not a record at all, no") is None
    assert decode_user("x", encode_user(rec)[:-1]) is None


def test_redis_batches_are_one_round_trip(redis_url, redis_prefix):
    name = f"grinfer-test-{uuid.uuid4().hex[:12]}"
    cache = RedisFeatureCache(redis_url, prefix=redis_prefix, client_name=name)
    observer = redis.Redis.from_url(redis_url)
    try:
        records = [record(f"p{i}", 20, 5, i) for i in range(100)]
        before = cache.stats()["round_trips"]
        cache.put_users(records, ttl_s=60)
        assert cache.stats()["round_trips"] == before + 1
        assert len(cache.keys()) == 100
        assert all(0 < observer.pttl(f"{redis_prefix}u:{r.user}") <= 60_000 for r in records[:5])

        got = cache.get_users([r.user for r in records])
        assert got == records
        assert cache.stats()["round_trips"] == before + 2
        # the server saw our connection's last command as a single MGET
        ours = [c for c in observer.client_list() if c.get("name") == name]
        assert ours and ours[0]["cmd"] == "mget"
    finally:
        cache.close()
        observer.close()


def test_redis_prefixes_isolate(redis_url, redis_prefix):
    a = RedisFeatureCache(redis_url, prefix=redis_prefix + "a:")
    b = RedisFeatureCache(redis_url, prefix=redis_prefix + "b:")
    try:
        a.put_user(record("same"), ttl_s=60)
        a.put_result("k", b"a", ttl_s=60)
        assert b.get_user("same") is None
        assert b.get_result("k") is None
        a.clear()
        assert a.keys() == [] and a.get_user("same") is None
    finally:
        a.close()
        b.close()


def test_redis_foreign_value_is_a_miss(redis_url, redis_prefix):
    cache = RedisFeatureCache(redis_url, prefix=redis_prefix)
    try:
        raw = redis.Redis.from_url(redis_url)
        raw.set(f"{redis_prefix}u:odd", b"something else", px=60_000)
        raw.close()
        assert cache.get_user("odd") is None
    finally:
        cache.close()


def test_open_cache_redis_url_prefix(redis_url, redis_prefix):
    cache = open_cache(f"{redis_url}?prefix={redis_prefix}")
    try:
        assert isinstance(cache.inner, RedisFeatureCache) and cache.prefix == redis_prefix
        cache.put_result("k", b"v", ttl_s=60)
        with redis.Redis.from_url(redis_url) as raw:
            assert raw.get(f"{redis_prefix}r:k") == b"v"
    finally:
        cache.close()
