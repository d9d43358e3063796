"""Affinity through each real balancer: every request of a user lands on one replica, REST and gRPC; the
fleet's KV hit ratio on a replayed trace matches one replica's, and round-robin's is far below it."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import grpc
import httpx
import pytest

from grinfer.serving.proto import grinfer_pb2 as pb
from grinfer.serving.proto import grinfer_pb2_grpc as pb_grpc

REPEATS = 4  # each user's request appears this many times in the trace
TS = iter(range(2_100_000_000, 2_200_000_000))  # event times, later than the dataset's


@pytest.fixture(scope="module")
def candidates(fleet) -> list[int]:
    with httpx.Client(base_url=fleet.replicas[0].url, timeout=10) as client:
        return sorted({e["item"] for u in fleet.users for e in client.get(f"/v1/users/{u}").json()["recent"]})[:8]


def reset_contexts(fleet) -> None:
    """Every user gets one new event and a roll: a new history version, so no replica holds usable K/V."""
    with httpx.Client(base_url=fleet.replicas[0].url, timeout=30) as client:
        for user in fleet.users:
            item = client.get(f"/v1/users/{user}").json()["recent"][0]["item"]
            assert client.post("/v1/events", json={"user": user, "events": [{"item": item, "ts": next(TS)}]},
                               headers={"X-User-Id": user}).status_code == 200
            assert client.post("/v1/admin/roll-history", json={"user": user}).json()["folded"] == 1


def replay(base_url: str, users: list[str], candidates: list[int], seed: int = 0) -> tuple[float, dict]:
    """The trace (each user REPEATS times, shuffled) one request after another: (the share of answers whose
    context came from a KV cache, {user: set of replicas that answered})."""
    trace = [u for u in users for _ in range(REPEATS)]
    random.Random(seed).shuffle(trace)
    cached, replicas = 0, {}
    with httpx.Client(base_url=base_url, timeout=60) as client:
        for user in trace:
            r = client.post("/v1/rank", json={"user": user, "candidates": [{"item": i} for i in candidates]},
                            headers={"X-User-Id": user})
            assert r.status_code == 200, r.text
            assert r.headers["x-grinfer-cache"] == r.json()["cache"]
            cached += r.json()["cache"] in ("hit", "partial")
            replicas.setdefault(user, set()).add(r.headers["x-grinfer-replica"])
    return cached / len(trace), replicas


@pytest.fixture(scope="module")
def single_replica_ratio(fleet, candidates) -> float:
    reset_contexts(fleet)
    ratio, replicas = replay(fleet.replicas[0].url, fleet.users, candidates)
    assert {name for names in replicas.values() for name in names} == {fleet.replicas[0].name}
    return ratio


def test_users_stick_to_one_replica_and_keep_their_cache(fleet, balancer, candidates, single_replica_ratio):
    reset_contexts(fleet)
    affine, replicas = replay(balancer.url, fleet.users, candidates)
    assert all(len(names) == 1 for names in replicas.values()), replicas
    assert len({name for names in replicas.values() for name in names}) > 1  # the users are spread out
    rr = fleet.balancer(balancer.kind, policy="round-robin")
    try:
        rr.start()
        reset_contexts(fleet)
        spread, rr_replicas = replay(rr.url, fleet.users, candidates)
    finally:
        rr.stop()
    print(f"\n{balancer.kind}: KV hit ratio single replica {single_replica_ratio:.3f}, fleet affine {affine:.3f}, "
          f"fleet round-robin {spread:.3f}")
    assert affine >= 0.9 * single_replica_ratio
    assert sum(len(n) for n in rr_replicas.values()) > len(fleet.users)  # round-robin did spread users
    assert spread <= 0.75 * single_replica_ratio


def test_a_header_that_names_another_user_is_refused(fleet, balancer, candidates):
    a, b = fleet.users[:2]
    body = {"user": a, "candidates": [{"item": candidates[0]}]}
    r = httpx.post(f"{balancer.url}/v1/rank", json=body, headers={"X-User-Id": b}, timeout=30)
    assert r.status_code == 422 and r.json()["field"] == "user" and "X-User-Id" in r.json()["error"]
    assert "x-grinfer-replica" in r.headers


def test_grpc_passes_through_with_the_same_affinity(fleet, balancer, candidates):
    request = lambda user: pb.RankRequest(user=user, candidates=[pb.Candidate(item=i) for i in candidates])
    with grpc.insecure_channel(f"127.0.0.1:{balancer.grpc_port}") as channel:
        stub = pb_grpc.RecommenderStub(channel)
        by_user = {}
        for user in fleet.users[:8]:
            for _ in range(2):
                response, call = stub.Rank.with_call(request(user), metadata=(("x-user-id", user),), timeout=30)
                assert response.user == user and len(response.items) == len(candidates)
                by_user.setdefault(user, set()).add(dict(call.trailing_metadata())["x-grinfer-replica"])
        assert all(len(names) == 1 for names in by_user.values()), by_user
        if balancer.kind != "nginx":  # nginx places gRPC servers on a ring of their own (their addresses)
            assert all(names == {balancer.served_by(user)} for user, names in by_user.items())
        with pytest.raises(grpc.RpcError) as refused:
            stub.Rank(request(fleet.users[0]), metadata=(("x-user-id", fleet.users[1]),), timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.details().startswith("user:")
        trailing = dict(refused.value.trailing_metadata())
        assert trailing["grinfer-field"] == "user"
        assert trailing["x-grinfer-replica"] in by_user[fleet.users[1]]  # the balancer routed it by the header


def test_the_fleet_bench_measures_the_balancer_against_a_direct_replica(fleet, balancer, tmp_path):
    out = tmp_path / "fleet.json"
    done = subprocess.run([sys.executable, "-m", "grinfer.cli", "deploy", "bench", "--direct", fleet.replicas[0].url,
                           "--via", f"{balancer.kind}={balancer.url}", "--users", "6", "--repeats", "3",
                           "--clients", "2", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].split()[:3] == ["target", "requests", "errors"]
    direct, through = json.loads(out.read_text())["targets"]
    assert direct["name"] == "direct" and through["name"] == balancer.kind
    for target in (direct, through):
        assert target["requests"] == 18 and target["errors"] == 0 and target["replicas_per_user"] == 1.0
        assert target["hit_ratio"] == pytest.approx(2 / 3)  # each user: a miss, then two hits
    assert direct["replicas"] == 1 and through["added_p50_ms"] == pytest.approx(through["p50_ms"] - direct["p50_ms"])
