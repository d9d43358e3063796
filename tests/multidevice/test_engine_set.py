"""EngineSet below the server: the ring's placement, one disk tier shared by the engines (a user's spilled
K/V read by the engine that owns the user after a re-hash), roll fan-out, and the front-end workers' link."""

from __future__ import annotations

import subprocess
import sys

import pytest
from model_util import seeded_model

from grinfer.config import EngineConfig
from grinfer.engine import RankRequest
from grinfer.serving.engine_link import EngineClient, EngineHost
from grinfer.serving.engine_set import VNODES, EngineSet, HashRing, build_engines, members

USERS = [f"user-{i}" for i in range(4000)]


def test_the_ring_is_balanced_and_only_a_leaving_members_users_move():
    ring = HashRing(3)
    everyone = frozenset(range(3))
    owners = {u: ring.owner(u, everyone) for u in USERS}
    shares = [sum(o == m for o in owners.values()) / len(USERS) for m in range(3)]
    assert all(0.2 < s < 0.47 for s in shares), shares  # VNODES points each: no member far from a third
    without_1 = {u: ring.owner(u, frozenset({0, 2})) for u in USERS}
    assert all(without_1[u] == o for u, o in owners.items() if o != 1)  # the others' users stay
    assert {without_1[u] for u, o in owners.items() if o == 1} == {0, 2}  # member 1's spread over both
    assert ring.owner("anyone", frozenset()) is None


def test_the_ring_is_the_same_in_every_process():
    code = ("from grinfer.serving.engine_set import HashRing; r = HashRing(2); "
            "print([r.owner(f'user-{i}', frozenset({0, 1})) for i in range(64)])")
    here = HashRing(2, VNODES)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str([here.owner(f"user-{i}", frozenset({0, 1})) for i in range(64)])


@pytest.fixture
def engine_set(mtgr_cfg, catalog, tmp_path):
    config = EngineConfig(disk_cache_bytes=64 << 20, disk_cache_dir=str(tmp_path / "kv"), pipeline_depth=1)
    engines = build_engines(seeded_model(mtgr_cfg), catalog, config, ["cpu", "cpu"])
    assert isinstance(engines, EngineSet)
    yield engines.start()
    engines.shutdown()


def _request(make_request, user: str, seed: int) -> RankRequest:
    r = make_request(12, 3, 6, seed=seed)
    return RankRequest(user, 0, r.context, r.candidates, r.request_ts)


def test_a_rehashed_user_reads_the_kv_its_former_engine_spilled_to_the_shared_disk_tier(engine_set, make_request):
    user = next(u for u in USERS if engine_set.home(u) == 0)
    first = engine_set.rank_sync(_request(make_request, user, 1), timeout=60)
    assert first.cache == "miss"
    engine_set.engines[0].shutdown()  # a clean stop moves its K/V down to the tiers: the shared disk tier
    again = engine_set.rank_sync(_request(make_request, user, 1), timeout=60)
    assert engine_set.in_ring == [1] and engine_set.owner(user) == 1
    assert again.cache == "hit"
    assert engine_set.engines[1].stats()["kv_cache"]["disk_hits"] == 1
    assert (again.probabilities - first.probabilities).abs().max() <= 1e-5
    assert engine_set.stats()["engines"][0]["rehashed"] == 1


def test_forget_user_reaches_every_engine(engine_set, make_request):
    user = next(u for u in USERS if engine_set.home(u) == 1)
    engine_set.rank_sync(_request(make_request, user, 2), timeout=60)
    assert engine_set.forget_user(user, 1).result(30) is True  # its version-0 entry on engine 1 went
    assert engine_set.forget_user(user, 1).result(30) is False
    assert all(user not in e.core.cache.manager.entries for e in members(engine_set))


def test_workers_reach_an_engine_set_through_the_link(engine_set, make_request, tmp_path):
    host = EngineHost(engine_set, tmp_path / "engine.sock")
    client = EngineClient(tmp_path / "engine.sock")
    try:
        user = next(u for u in USERS if engine_set.home(u) == 1)
        result = client.call("rank", _request(make_request, user, 3)).result(60)
        assert result.cache == "miss"
        stats = client.stats()
        assert [e["dispatched"] for e in stats["engines"]] == [0, 1]
        assert client.health() is None
    finally:
        client.close()
        host.close()


def test_a_gpu_that_is_not_there_is_named_before_anything_is_built():
    import torch

    from grinfer.serving.engine_set import check_devices

    missing = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(ValueError, match=f"devices: {missing} not present"):
        check_devices(["cuda:0", missing] if torch.cuda.device_count() else [missing])
    check_devices(["cpu", "cpu"])
