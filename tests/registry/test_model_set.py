"""ModelSet over real engines (mtgr-tiny on the CPU): arm split and stickiness, KV isolation between arms,
hash checks before a load, swaps under concurrent requests, shadow scoring and the consistency check."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from model_util import SERVED_SPEC

from grinfer.config import EngineConfig
from grinfer.data import load_dataset
from grinfer.engine import Engine, RankRequest
from grinfer.engine.probe import synthetic_context
from grinfer.model.checkpoint import load_checkpoint
from grinfer.model.mtgr import MTGR
from grinfer.registry import Arm, HashMismatch, Registry, assign, open_registry, plan_for
from grinfer.serving.models import ModelSet
from grinfer.serving.service import FieldError
from grinfer.serving.versions import version_loader

CATALOG = load_dataset(SERVED_SPEC).catalog


def engine_for(path: Path, share: float = 1.0, key: str = "") -> Engine:
    model = load_checkpoint(path)
    assert isinstance(model, MTGR)
    return Engine(model, CATALOG, EngineConfig(kv_cache_bytes=int((4 << 20) * share), pipeline_depth=1))


def engine_of(served) -> Engine:
    assert isinstance(served, Engine)  # these tests serve each version on one device
    return served


def request(user: str, seed: int = 0, arm: str | None = None) -> RankRequest:
    rng = np.random.default_rng(seed)
    ctx = synthetic_context(rng, CATALOG.num_items, 4, 12, 3)
    candidates = rng.choice(np.arange(1, CATALOG.num_items + 1), 10, replace=False)
    return RankRequest(user, 0, ctx, candidates, 978_400_000, arm=arm)


@pytest.fixture
def reg(tmp_path: Path, make_model_dir):
    registry = open_registry(f"sqlite://{tmp_path}/store.db")
    for seed in (1, 2, 3):
        registry.register(make_model_dir(seed), "ranker")
    registry.promote("ranker", 1)
    yield registry
    registry.close()


def model_set(registry: Registry, **kwargs) -> ModelSet:
    plan = plan_for(registry, "ranker")
    engines = {key: engine_for(Path(v.path)) for key, v in plan.versions().items()}
    return ModelSet(plan, engines, CATALOG, loader=version_loader(engine_for), **kwargs).start()


@pytest.mark.parametrize("weights", [(0.5, 0.5), (0.98, 0.02), (0.2, 0.3, 0.5), (1.0, 1.0, 1.0, 1.0)])
def test_split_over_10000_users_is_within_1_percent_and_sticky(weights):
    arms = [Arm(f"arm{i}", w) for i, w in enumerate(weights)]
    users = [f"user-{i}" for i in range(10_000)]
    chosen = [assign("exp", u, arms).name for u in users]
    for arm in arms:
        share = chosen.count(arm.name) / len(users)
        assert abs(share - arm.weight / sum(weights)) < 0.01, (arm, share)
    assert [assign("exp", u, list(arms)).name for u in users[:500]] == chosen[:500]  # sticky, any process
    other = [assign("exp-2", u, arms).name for u in users[:500]]
    assert other != chosen[:500]  # another experiment reshuffles users


def test_arms_never_share_kv_entries(reg: Registry):
    reg.start_experiment("ab", "ranker", [Arm("control", 0.5), Arm("treatment", 0.5, 2)])
    models = model_set(reg)
    try:
        plan = models.plan
        users = [f"u{i}" for i in range(24)]
        answers = {u: [models.rank_sync(request(u), 30) for _ in range(2)] for u in users}
        for u, (first, second) in answers.items():
            arm = plan.arm_for(u)
            assert (first.arm, first.model_version) == (arm.name, arm.key)
            assert (first.cache, second.cache) == ("miss", "hit")
        held = [set(engine_of(e).core.cache.manager.entries) for e in models.engines_by_version()]
        assert held[0] and held[1] and not held[0] & held[1]
        for entries, key in zip(held, ("ranker:1", "ranker:2")):
            assert entries == {u for u in users if plan.arm_for(u).key == key}
        control_user = next(u for u in users if plan.arm_for(u).name == "control")
        forced = models.rank_sync(request(control_user, arm="treatment"), 30)
        assert (forced.arm, forced.model_version, forced.cache) == ("treatment", "ranker:2", "miss")
        assert not torch.allclose(forced.probabilities, answers[control_user][0].probabilities)
        assert all(control_user in engine_of(e).core.cache.manager.entries for e in models.engines_by_version())
        models.forget_user(control_user, 1).result(30)  # a history roll frees the user's K/V in every version
        for e in models.engines_by_version():
            engine_of(e).call(lambda: None).result(30)
            assert control_user not in engine_of(e).core.cache.manager.entries
        with pytest.raises(FieldError, match="no arm 'nope'"):
            models.submit(request(control_user, arm="nope"))
    finally:
        models.shutdown()


def test_changed_checkpoint_refuses_to_load_and_the_plan_stays(reg: Registry):
    models = model_set(reg)
    try:
        reg.promote("ranker", 2)
        weights = Path(reg.get("ranker", 2).path) / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-1] + b"\0")  # changed after its promotion
        with pytest.raises(HashMismatch):
            models.apply(plan_for(reg, "ranker"))
        with pytest.raises(HashMismatch):
            reg.promote("ranker", 2)  # and no longer promotable
        assert models.plan.production.key == "ranker:1"
        assert models.rank_sync(request("u1"), 30).model_version == "ranker:1"
    finally:
        models.shutdown()


def test_swaps_under_concurrent_requests_lose_nothing(reg: Registry):
    models = model_set(reg)
    errors, answered, stop = [], [], threading.Event()

    def client(i: int) -> None:
        n = 0
        while not stop.is_set():
            try:
                answered.append(models.rank_sync(request(f"c{i}-{n % 3}", seed=n), 30).model_version)
            except Exception as exc:  # any failure is a lost request
                errors.append(exc)
            n += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        first = models.engines_by_version()[0]
        for version in (2, 3, 1):
            reg.promote("ranker", version)
            record = models.apply(plan_for(reg, "ranker"))
            assert record["added"] == [f"ranker:{version}"] and len(record["removed"]) == 1
        stop.set()
        for t in threads:
            t.join()
        assert errors == []
        assert {"ranker:1", "ranker:2", "ranker:3"} <= set(answered)
        assert not first.running  # the first production engine drained and stopped
        assert models.rank_sync(request("after"), 30).model_version == "ranker:1"
    finally:
        stop.set()
        models.shutdown()


def test_shadow_scores_sampled_traffic_in_the_background(reg: Registry):
    reg.start_experiment("shadowed", "ranker", [Arm("production", 1.0)], shadow_version=1, shadow_fraction=1.0)
    models = model_set(reg)
    try:
        assert models.shadow is not None
        for i in range(6):
            assert models.rank_sync(request(f"s{i}", seed=i), 30).model_version == "ranker:1"
        models.shutdown()  # drains the shadow copies too
        stats = models.describe()["shadow"]
        # a copy meeting a busy shadow is dropped, not queued (a loaded machine may drop some of the six)
        assert stats["compared"] + stats["dropped"] == 6 and stats["compared"] >= 1 and stats["failed"] == 0
        assert stats["rank_correlation"] == pytest.approx(1.0)  # the same version: the same ranking
        assert stats["max_abs_delta"] < 1e-5
    finally:
        models.shutdown()


def test_shadow_of_another_version_differs(reg: Registry):
    reg.start_experiment("shadowed", "ranker", [Arm("production", 1.0)], shadow_version=3, shadow_fraction=1.0)
    models = model_set(reg)
    try:
        for i in range(6):
            models.rank_sync(request(f"s{i}", seed=i), 30)
        models.shutdown()
        stats = models.describe()["shadow"]
        # a copy is dropped when the shadow is busy (never queued behind production): on a loaded machine
        # some of the six may be; every one is either compared or counted as dropped
        assert stats["compared"] + stats["dropped"] == 6 and stats["compared"] >= 1 and stats["failed"] == 0
        assert stats["rank_correlation"] < 0.99 and stats["max_abs_delta"] > 1e-3
    finally:
        models.shutdown()


def test_consistency_check_passes_clean_cache_and_catches_a_corrupt_one(reg: Registry):
    models = model_set(reg, consistency_fraction=1.0)
    try:
        check, engine = models._loaded["ranker:1"].check, engine_of(models.production)
        assert check is not None
        for i in range(4):
            for _ in range(2):  # a miss, then a hit
                models.rank_sync(request(f"k{i}", seed=i), 30)
                engine.call(lambda: None).result(30)  # the check ran before this call
        assert check.checks == 8 and check.exceeded == 0 and check.max_abs_diff <= check.tolerance
        engine.core.pool.k.add_(0.5)  # corrupt every cached key
        models.rank_sync(request("k0", seed=0), 30)
        engine.call(lambda: None).result(30)
        assert check.exceeded == 1 and check.max_abs_diff > check.tolerance
    finally:
        models.shutdown()



def test_consistency_check_of_8_bit_kv_uses_its_documented_tolerance(reg: Registry):
    plan = plan_for(reg, "ranker")
    model = load_checkpoint(Path(plan.production.path))
    assert isinstance(model, MTGR)
    engine = Engine(model, CATALOG, EngineConfig(kv_cache_bytes=4 << 20, pipeline_depth=1, kv_dtype="int8"))
    models = ModelSet(plan, {plan.production.key: engine}, CATALOG, consistency_fraction=1.0).start()
    try:
        check = models._loaded[plan.production.key].check
        assert check is not None and check.tolerance == 5e-3
        for _ in range(2):  # a miss, then a hit read from the 8-bit pool
            models.rank_sync(request("q", seed=1), 30)
            engine.call(lambda: None).result(30)
        assert check.checks == 2 and check.exceeded == 0 and 0 < check.max_abs_diff <= check.tolerance
    finally:
        models.shutdown()


def test_grpc_answers_name_arm_and_version(reg: Registry, tmp_path: Path):
    import grpc

    from grinfer.serving.grpc_server import ARM_METADATA, VERSION_METADATA, start_grpc_server
    from grinfer.serving.metrics import Metrics
    from grinfer.serving.proto import grinfer_pb2 as pb
    from grinfer.serving.proto import grinfer_pb2_grpc as pb_grpc
    from grinfer.serving.service import RecommenderService
    from grinfer.storage import open_cache, open_store
    from grinfer.storage.importer import import_dataset

    reg.start_experiment("ab", "ranker", [Arm("control", 0.5), Arm("treatment", 0.5, 2)])
    models = model_set(reg)
    store, dataset = open_store(f"sqlite://{tmp_path}/grpc.db"), load_dataset(SERVED_SPEC)
    import_dataset(dataset, store, progress=False)
    # a ModelSet has the Engine interface (build_server hands it to the service the same way, through front_state)
    service = RecommenderService(models, CATALOG, store, open_cache("memory://"))  # pyright: ignore[reportArgumentType]
    server = start_grpc_server(service, Metrics(models, "eager"), "127.0.0.1", 0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.RecommenderStub(channel)
            for user in [u.user_id for u in dataset.users[:6]]:
                request = pb.RankRequest(user=str(user), candidates=[pb.Candidate(item=int(CATALOG.raw_ids[1]))])
                _, call = stub.Rank.with_call(request, timeout=30)
                named = dict(call.trailing_metadata())
                arm = models.plan.arm_for(str(user))
                assert (named[ARM_METADATA], named[VERSION_METADATA]) == (arm.name, arm.key)
    finally:
        server.stop(grace=1).wait()
        models.shutdown()
        store.close()
