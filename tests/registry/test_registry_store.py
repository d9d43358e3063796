"""The registry on SQLite and PostgreSQL: versions, stages, hashes, experiments and the serving plan."""

from __future__ import annotations

import pytest
from registry_util import BOTH_STORES

from grinfer.registry import Arm, HashMismatch, Registry, RegistryError, open_registry, plan_for

pytestmark = BOTH_STORES


def test_register_numbers_versions_and_records_metadata(registry: Registry, make_model_dir, store_url):
    first, second = make_model_dir(1), make_model_dir(2)
    v1, v2 = registry.register(first, "ranker"), registry.register(second, "ranker")
    assert (v1.version, v2.version, v1.stage) == (1, 2, "staging")
    assert v1.content_hash != v2.content_hash
    assert v1.config["ranking"]["kind"] == "mtgr" and v1.metrics["ranking"]["seed"] == 1
    reopened = open_registry(store_url)  # durable, and migrations are idempotent on reopen
    try:
        assert [v.key for v in reopened.versions("ranker")] == ["ranker:1", "ranker:2"]
    finally:
        reopened.close()


def test_promote_keeps_one_production_version(registry: Registry, make_model_dir):
    for seed in (1, 2):
        registry.register(make_model_dir(seed), "ranker")
    assert registry.production("ranker") is None
    registry.promote("ranker", 1)
    registry.promote("ranker", 2)
    assert [v.stage for v in registry.versions("ranker")] == ["archived", "production"]
    production = registry.production("ranker")
    assert production is not None and production.version == 2
    with pytest.raises(RegistryError, match="version: model 'ranker' has no version 9"):
        registry.promote("ranker", 9)


def test_changed_checkpoint_fails_verification(registry: Registry, make_model_dir):
    path = make_model_dir(3)
    version = registry.register(path, "ranker")
    Registry.verify(version)
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(HashMismatch, match="refusing to load"):
        Registry.verify(version)


def test_experiment_plan_and_bad_definitions(registry: Registry, make_model_dir):
    for seed in (1, 2, 3):
        registry.register(make_model_dir(seed), "ranker")
    with pytest.raises(RegistryError, match="no production version"):
        plan_for(registry, "ranker")
    registry.promote("ranker", 1)
    assert [a.key for a in plan_for(registry, "ranker").arms] == ["ranker:1"]
    registry.start_experiment("ab", "ranker", [Arm("control", 0.9), Arm("treatment", 0.1, 2)], shadow_version=3,
                              shadow_fraction=0.5)
    plan = plan_for(registry, "ranker")
    assert [(a.name, a.key) for a in plan.arms] == [("control", "ranker:1"), ("treatment", "ranker:2")]
    assert list(plan.versions()) == ["ranker:1", "ranker:2", "ranker:3"]
    registry.promote("ranker", 3)  # the control arm follows production
    assert plan_for(registry, "ranker").arms[0].key == "ranker:3"
    with pytest.raises(RegistryError, match="already runs"):
        registry.start_experiment("ab2", "ranker", [Arm("a", 1.0)])
    registry.stop_experiment("ab")
    assert plan_for(registry, "ranker").experiment is None
    for arms, message in (([], "at least one arm"), ([Arm("a", 0.0)], "weight must be > 0"),
                          ([Arm("a", 1.0), Arm("a", 1.0)], "distinct"), ([Arm("a", 1.0, 7)], "no version 7")):
        with pytest.raises(RegistryError, match=message):
            registry.start_experiment("bad", "ranker", arms)
