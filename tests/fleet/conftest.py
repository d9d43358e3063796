"""The fleet the tests share: three `grinfer serve` replicas started at once (so the first start's
migrations and import race for real) on a fresh PostgreSQL database and a Redis prefix of their own."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fleet_util import BALANCERS, Balancer, Database, RedisPrefix, Replica

NUM_REPLICAS = 3


@dataclass
class Fleet:
    db: Database
    replicas: list[Replica]
    users: list[str]
    workdir: Path
    at_start: dict[str, int]  # rows per table right after the concurrent starts, before any test wrote

    def replica(self, name: str) -> Replica:
        return next(r for r in self.replicas if r.name == name)

    def balancer(self, kind: str, policy: str = "hash") -> Balancer:
        return Balancer(kind, self.replicas, self.workdir, policy)


@pytest.fixture(scope="package")
def fleet(served_checkpoint, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("fleet")
    db, prefix = Database(), RedisPrefix()
    replicas = [Replica(f"r{i}", served_checkpoint, db.url, prefix.url, workdir) for i in range(NUM_REPLICAS)]
    try:
        for r in replicas:  # all at once on the empty database: migrations and the first import race
            r.start()
        for r in replicas:
            r.wait_ready()
        users = [str(u) for u in httpx.get(f"{replicas[0].url}/v1/users", params={"limit": 1000}).json()["users"]]
        at_start = {t: db.query(f"SELECT count(*) FROM {t}")[0][0] for t in ("users", "events", "items")}
        yield Fleet(db, replicas, users, workdir, at_start)
    finally:
        for r in replicas:
            r.stop()
        db.close()
        prefix.close()


@pytest.fixture(scope="module", params=BALANCERS)
def balancer(request, fleet):
    """Each real balancer in turn (hash policy) in front of the fleet, once per test module."""
    b = fleet.balancer(request.param)
    try:
        yield b.start()
    finally:
        b.stop()
