"""Three replicas started at once on one empty PostgreSQL database: the schema migrations run once, the
first start's import of the catalogue and users happens once, and every replica comes up ready."""

from __future__ import annotations

import httpx

from grinfer.data import load_dataset

SERVED_SPEC = "synthetic:users=20,items=60,events=15,seed=0"  # what served_checkpoint was trained on


def test_concurrent_starts_migrate_and_import_once(fleet):
    versions = fleet.db.query("SELECT version, count(*) FROM schema_version GROUP BY version ORDER BY version")
    assert versions and [n for _, n in versions] == [1] * len(versions)
    assert [v for v, _ in versions] == list(range(1, len(versions) + 1))
    ds = load_dataset(SERVED_SPEC)
    assert fleet.at_start["users"] == len(ds.users) == len(fleet.users)
    assert fleet.at_start["events"] == ds.num_events
    assert fleet.at_start["items"] == len(ds.catalog.raw_ids)  # with the padding row 0


def test_every_replica_names_itself(fleet):
    names = set()
    for r in fleet.replicas:
        response = httpx.get(f"{r.url}/readyz", timeout=5.0)
        assert response.status_code == 200
        names.add(response.headers["x-grinfer-replica"])
    assert names == {r.name for r in fleet.replicas}
