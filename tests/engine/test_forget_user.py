"""`Engine.forget_user`: a history roll made elsewhere (another replica) frees the user's older K/V, on the
device and in the tiers; a newer entry, or one a running request pins, stays."""

from __future__ import annotations

from engine_util import assert_unpinned, engine_request, kv_bytes, make_core, run

from grinfer.engine import Engine


def cold_users_of(make_request, n: int, shape: tuple[int, int, int]):
    return [engine_request(f"u{i}", make_request(*shape, seed=500 + i)) for i in range(n)]


def test_older_versions_are_freed_everywhere(model, catalog, make_request, tmp_path):
    core = make_core(model, catalog, block_size=4, kv_cache_bytes=kv_bytes(model, 2 * 20),
                     host_cache_bytes=kv_bytes(model, 20), disk_cache_bytes=kv_bytes(model, 200),
                     disk_cache_dir=str(tmp_path))
    reqs = cold_users_of(make_request, 4, shape=(12, 2, 3))  # 18 tokens each: two fit the device pool
    for req in reqs:  # one at a time: each new user evicts the least recent one
        run(core, [req])
    stats = core.stats()["kv_cache"]
    assert (stats["users"], stats["host_users"], stats["disk_users"]) == (2, 1, 1)
    device_user, host_user, disk_user = reqs[3].user, reqs[1].user, reqs[0].user
    assert not core.cache.drop_stale(device_user, 0)  # not older than version 0: kept
    for user in (device_user, host_user, disk_user):
        core.cache.drop_stale(user, 1)
    stats = core.stats()["kv_cache"]
    assert (stats["users"], stats["host_users"], stats["disk_users"]) == (1, 0, 0)
    assert core.cache.manager.get(device_user) is None and core.cache.manager.get(reqs[2].user) is not None
    assert_unpinned(core)
    core.close()


def test_the_facade_runs_it_on_the_engine_thread(model, catalog, make_request):
    engine = Engine(model, catalog, make_core(model, catalog).config)
    with engine:
        (req,) = cold_users_of(make_request, 1, shape=(5, 1, 2))
        engine.rank_sync(req, 60)
        assert engine.forget_user(req.user, 1).result(10) is True
        assert engine.forget_user(req.user, 1).result(10) is False  # nothing left
        assert engine.stats()["kv_cache"]["users"] == 0
