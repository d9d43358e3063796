"""Shared state across replicas: an event written through one replica is in the next request another one
serves, a reader that raced a write cannot re-cache the stale record, and a roll through any replica
frees that user's K/V on every replica (the next request there misses, on the new history version)."""

from __future__ import annotations

import httpx
import redis
from fleet_util import REDIS, wait_for

from grinfer.storage.base import Event, UserRecord
from grinfer.storage.redis_cache import RedisFeatureCache

TS = iter(range(2_300_000_000, 2_400_000_000))


def rank(replica, user: str, items: list[int]) -> dict:
    r = httpx.post(f"{replica.url}/v1/rank", json={"user": user, "candidates": [{"item": i} for i in items]},
                   headers={"X-User-Id": user}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["x-grinfer-replica"] == replica.name
    return r.json()


def items_of(replica, user: str) -> list[int]:
    return sorted({e["item"] for e in httpx.get(f"{replica.url}/v1/users/{user}", timeout=10).json()["recent"]})


def post_event(replica, user: str, item: int) -> None:
    r = httpx.post(f"{replica.url}/v1/events", json={"user": user, "events": [{"item": item, "ts": next(TS)}]},
                   headers={"X-User-Id": user}, timeout=30)
    assert r.status_code == 200, r.text


def test_an_event_through_one_replica_is_in_the_next_request_on_another(fleet):
    a, b, _ = fleet.replicas
    user = fleet.users[3]
    items = items_of(a, user)[:5]
    rank(b, user, items)
    assert rank(b, user, items)["cache"] == "hit"  # b's context is cached, and so is the user's record
    client = redis.Redis.from_url(REDIS)
    prefix = fleet.replicas[0].cache.split("prefix=")[1]
    assert client.exists(f"{prefix}u:{user}")
    post_event(a, user, items[0])
    assert rank(b, user, items)["cache"] == "partial"  # the new event is in b's context: computed on top
    client.close()


def test_a_reader_that_raced_a_write_cannot_recache_the_stale_record(fleet):
    """The race, step by step, between two replicas' caches on the fleet's Redis prefix."""
    prefix = fleet.replicas[0].cache.split("prefix=")[1] + "race:"
    reader, writer = RedisFeatureCache(REDIS, prefix=prefix), RedisFeatureCache(REDIS, prefix=prefix)
    try:
        before = UserRecord("u", [1, 2], 1, [Event(1, 10, 5)])
        assert reader.get_user("u") is None  # a miss: the reader goes to the store and reads `before`
        writer.invalidate_user("u")  # meanwhile another replica appends an event and invalidates
        reader.put_user(before, ttl_s=60)  # the reader caches what it read: already stale
        assert writer.get_user("u") is None and reader.get_user("u") is None  # ... and nobody is served it
        after = UserRecord("u", [1, 2], 1, [Event(1, 10, 5)], [Event(2, 20, 4)])
        reader.put_user(after, ttl_s=60)  # a fresh read after the write caches normally
        assert writer.get_user("u") == after
    finally:
        reader.clear()
        reader.close()
        writer.close()


def test_a_roll_through_any_replica_frees_the_users_kv_on_every_replica(fleet):
    a, b, c = fleet.replicas
    user = fleet.users[5]
    items = items_of(a, user)[:5]
    for replica in (a, b):
        rank(replica, user, items)
        assert rank(replica, user, items)["cache"] == "hit"
    held = {r.name: r.metric("grinfer_kv_cache_users") for r in (a, b)}
    post_event(c, user, items[0])
    rolled = httpx.post(f"{c.url}/v1/admin/roll-history", json={"user": user}, timeout=30).json()
    assert rolled["folded"] == 1
    for replica in (a, b):  # no request for the user reaches a or b: the announcement alone frees the K/V
        wait_for(lambda r=replica: r.metric("grinfer_kv_cache_users") == held[r.name] - 1, 20,
                 f"{replica.name} to drop {user}'s K/V")
    out = rank(a, user, items)
    assert out["history_version"] == rolled["history_version"] and out["cache"] == "miss"
