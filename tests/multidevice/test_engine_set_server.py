"""Two engines (devices cpu,cpu) in one real server: the same answers as one engine, each user's requests
on one engine with both engines used, a failing engine leaving the ring (errors only for the requests it
took while failing) and rejoining once healthy, and metrics labelled by engine."""

from __future__ import annotations

import random
import time

import pytest
from multidevice_util import device_fault
from prometheus_client.parser import text_string_to_metric_families

from grinfer.engine.engine import UNHEALTHY_AFTER
from grinfer.serving.engine_set import EngineSet


def _items(served, n: int, seed: int) -> list[int]:
    raw = [int(i) for i in served.server.state.service.catalog.raw_ids[1:]]
    return random.Random(seed).sample(raw, n)


def _scores(response) -> dict[int, float]:
    assert response.status_code == 200, response.text
    return {r["item"]: r["score"] for r in response.json()["items"]}


def _cached_users(engine) -> set[str]:
    return {u for u in engine.core.cache.manager.entries if not u.startswith("__")}


def _samples(served, name: str) -> dict[tuple, float]:
    text = served.http.get("/metrics").text
    family = next(f for f in text_string_to_metric_families(text) if f.name == name)
    return {tuple(sorted(s.labels.items())): s.value for s in family.samples}


def test_two_engines_answer_as_one_engine_cold_and_warm(servers):
    one, two = servers
    assert isinstance(two.engine, EngineSet) and not isinstance(one.engine, EngineSet)
    for round_ in ("cold", "warm"):
        for n, user in enumerate(one.users()):
            items = _items(one, 12, n)
            a, b = one.rank(user, items), two.rank(user, items)
            assert a.json()["cache"] == b.json()["cache"], (round_, user)
            expected, got = _scores(a), _scores(b)
            assert expected.keys() == got.keys()
            for item, score in expected.items():
                assert abs(got[item] - score) <= 1e-5, (round_, user, item)


def test_each_user_stays_on_one_engine_and_both_are_used(servers):
    _, two = servers
    users = two.users()
    for _ in range(3):
        for n, user in enumerate(users):
            assert two.rank(user, _items(two, 8, n)).status_code == 200
    cached = [_cached_users(e) for e in two.engine.engines]
    assert cached[0] and cached[1], "both engines serve users"
    assert not cached[0] & cached[1], "no user has K/V on two engines"
    assert cached[0] | cached[1] == set(users)
    for user in users:
        assert user in cached[two.engine.owner(user)]
    # after the first request every answer is a hit: each user came back to the engine holding its K/V
    assert all(two.rank(u, _items(two, 8, n)).json()["cache"] == "hit" for n, u in enumerate(users))


def test_metrics_carry_engine_and_device_labels(servers):
    _, two = servers
    assert two.rank(two.users()[0], _items(two, 4, 0)).status_code == 200
    hits = _samples(two, "grinfer_kv_cache_misses")
    assert set(hits) == {(("device", "cpu"), ("engine", "0")), (("device", "cpu"), ("engine", "1"))}
    for name in ("grinfer_queue_depth", "grinfer_device_memory_bytes", "grinfer_engine_in_ring",
                 "grinfer_engine_dispatched", "grinfer_backend_active"):
        assert {dict(k)["engine"] for k in _samples(two, name)} == {"0", "1"}, name
    stats = two.engine.stats()
    assert sum(e["kv_cache"]["misses"] for e in stats["engines"]) == stats["kv_cache"]["misses"]


def test_a_failing_engine_leaves_the_ring_its_users_move_and_it_rejoins(servers):
    _, two = servers
    engine_set = two.engine
    users = two.users()
    victim = engine_set.owner(users[0])
    theirs = [u for u in users if engine_set.owner(u) == victim]
    others = [u for u in users if engine_set.owner(u) != victim]
    assert others, "the other engine owns some users"
    before = _samples(two, "grinfer_engine_rehashed")
    failed = []
    with device_fault(engine_set.engines[victim]):
        for n, user in enumerate(theirs * 2):  # one request at a time: each failed one is a failed device turn
            r = two.rank(user, _items(two, 6, n))
            if r.status_code != 200:
                assert r.status_code == 503 and "Retry-After" in r.headers, r.text  # retry: another engine
                failed.append(r.status_code)
        for n, user in enumerate(others):
            assert two.rank(user, _items(two, 6, n)).status_code == 200  # never touched by the failure
        assert len(failed) == UNHEALTHY_AFTER  # only those it took before its health failed
        assert engine_set.in_ring == [1 - victim]
        assert all(engine_set.owner(u) == 1 - victim for u in theirs)
        assert two.http.get("/readyz").status_code == 200  # the set still serves
    ring = dict(_samples(two, "grinfer_engine_in_ring"))
    assert ring[(("device", "cpu"), ("engine", str(victim)))] == 0.0
    key = (("device", "cpu"), ("engine", str(victim)))
    moved = _samples(two, "grinfer_engine_rehashed")[key] - before.get(key, 0.0)
    assert moved == 2 * len(theirs) - UNHEALTHY_AFTER
    assert _samples(two, "grinfer_engine_ring_leaves")[key] >= 1
    deadline = time.monotonic() + 30  # healed: the monitor's probe succeeds and the engine rejoins
    while victim not in engine_set.in_ring and time.monotonic() < deadline:
        time.sleep(0.1)
    assert engine_set.in_ring == [0, 1]
    assert _samples(two, "grinfer_engine_ring_joins")[key] >= 1
    assert engine_set.owner(theirs[0]) == victim
    assert two.rank(theirs[0], _items(two, 6, 0)).status_code == 200


@pytest.mark.parametrize("devices, message", [("cpu,gpu", "cpu or cuda:N"), ("cuda:0,cpu", "one type"),
                                              ("cuda:1,cuda:1", "named twice")])
def test_bad_devices_are_refused_naming_the_setting(devices, message):
    from grinfer.config import SettingError, load_server_config

    with pytest.raises(SettingError, match="devices") as err:
        load_server_config(env={}, devices=devices)
    assert message in str(err.value)
