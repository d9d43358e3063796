"""The exported repository on a real `tritonserver` (nvidia-pytriton's, CPU), queried with tritonclient.

The server runs from the Triton environment (tests/tritonserver_env.py) on free loopback ports; the
client scripts run there too (tritonclient cannot live in .venv). grinfer's own /v1/rank answer comes from
its RecommenderService in this process, over the same checkpoint and store, with the same request time.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from tritonserver_env import TritonServer, triton_env_or_skip
from typer.testing import CliRunner

import grinfer.serving.service as service_module
from grinfer.cli import app
from grinfer.config import ServerConfig
from grinfer.schema import RankIn
from grinfer.serving.server import build_server
from grinfer.serving.service import RecommenderService, ServiceSettings

CLIENT = (Path(__file__).parent / "triton_client.py").read_text()
REQUEST_TS = 1_700_000_000
TASK_WEIGHTS = {"ctr": 1.0, "ctcvr": 2.0}
MODELS = ["ensemble_model", "preprocess_py", "embedding_service", "gr_model", "interaction_python"]


@pytest.fixture(scope="module")
def env():
    return triton_env_or_skip()


@pytest.fixture(scope="module")
def store_url(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('triton-store') / 'store.db'}"


@pytest.fixture(scope="module")
def repository(served_checkpoint, store_url, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("triton") / "repo"
    result = CliRunner().invoke(app, ["export", "triton-repo", "--model", str(served_checkpoint), "--out", str(out),
                                      "--store", store_url, "--task-weights", json.dumps(TASK_WEIGHTS)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def server(env, repository, tmp_path_factory):
    with TritonServer(env, repository, tmp_path_factory.mktemp("triton-log") / "tritonserver.log") as srv:
        yield srv


@pytest.fixture(scope="module")
def grinfer_side(served_checkpoint, store_url):
    """grinfer's server parts over the same checkpoint and store, and a /v1/rank service with the task weights
    the repository was exported with."""
    built = build_server(ServerConfig(store=store_url), served_checkpoint, "cpu")
    built.service = RecommenderService(built.engine, built.state.service.catalog, built.store, built.cache,
                                       ServiceSettings(task_weights=TASK_WEIGHTS))
    yield built
    built.close()


def call(env, server, protocol: str, op: str, **job):
    url = server.grpc_url if protocol == "grpc" else server.http_url
    return env.run_client(CLIENT, {"url": url, "protocol": protocol, "op": op, **job})


def triton_request(built, user: str, candidates: list[int]) -> dict:
    """The raw tensors of a request for a stored user: profile, S + R events, candidates (catalogue ids)."""
    record = built.store.get_user(user)
    events = record.static + record.realtime
    raw = built.service.catalog.raw_ids
    return {"USER_ID": ["BYTES", [user]], "PROFILE": ["INT64", list(record.profile)],
            "EVENT_ITEMS": ["INT64", [int(raw[e.item]) for e in events]],
            "EVENT_TIMESTAMPS": ["INT64", [e.ts for e in events]],
            "EVENT_ACTIONS": ["INT64", [e.action for e in events]],
            "CANDIDATE_ITEMS": ["INT64", candidates], "NUM_STATIC": ["INT64", [len(record.static)]],
            "HISTORY_VERSION": ["INT64", [record.history_version]], "REQUEST_TS": ["INT64", [REQUEST_TS]]}


def grinfer_rank(built, user: str, candidates: list[int], monkeypatch) -> list[tuple[int, float, list[float]]]:
    """(item, fused score, probabilities) best first, as grinfer's /v1/rank answers at REQUEST_TS."""
    clock = SimpleNamespace(time=lambda: float(REQUEST_TS), perf_counter=time.perf_counter, monotonic=time.monotonic)
    req = RankIn.model_validate({"user": user, "candidates": [{"item": c} for c in candidates]})
    with monkeypatch.context() as patch:
        patch.setattr(service_module, "time", clock)  # the service's request time, as the Triton request's
        ranked = asyncio.run(built.service.rank(req))
    return [(i.item, i.score, list(i.probabilities.values())) for i in ranked.items]


def candidates_for(built, seed: int, count: int = 12) -> list[int]:
    raw = built.service.catalog.raw_ids[1:]
    return [int(x) for x in np.random.default_rng(seed).choice(raw, size=count, replace=False)]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_ensemble_scores_equal_grinfer_rank(env, server, grinfer_side, protocol, monkeypatch):
    users = grinfer_side.store.list_users(3, 0)
    jobs = [(user, candidates_for(grinfer_side, seed)) for seed, user in enumerate(users)]
    answers = call(env, server, protocol, "infer", model="ensemble_model",
                   requests=[triton_request(grinfer_side, u, c) for u, c in jobs])
    for (user, cands), answer in zip(jobs, answers):
        assert "outputs" in answer, answer
        got = answer["outputs"]
        want = grinfer_rank(grinfer_side, user, cands, monkeypatch)
        assert got["ITEMS"] == [w[0] for w in want]
        np.testing.assert_allclose(got["SCORES"], [w[1] for w in want], rtol=0, atol=1e-5)
        np.testing.assert_allclose(got["PROBABILITIES"], [w[2] for w in want], rtol=0, atol=1e-5)


def test_returning_user_is_served_from_the_kv_cache(env, server, grinfer_side):
    user = grinfer_side.store.list_users(1, 5)[0]
    request = triton_request(grinfer_side, user, candidates_for(grinfer_side, 7))
    first, second = call(env, server, "http", "infer", model="ensemble_model", requests=[request, request])
    assert first["outputs"]["CACHE"] == ["miss"] and first["outputs"]["CACHED_TOKENS"] == [0]
    assert second["outputs"]["CACHE"] == ["hit"]
    assert second["outputs"]["CACHED_TOKENS"] == first["outputs"]["COMPUTED_TOKENS"]
    assert second["outputs"]["COMPUTED_TOKENS"] == [0]
    assert second["outputs"]["SCORES"] == pytest.approx(first["outputs"]["SCORES"], abs=1e-5)
    # one more event: the cached context is extended (partial), not recomputed
    request["EVENT_ITEMS"][1].append(request["CANDIDATE_ITEMS"][1][0])
    request["EVENT_TIMESTAMPS"][1].append(REQUEST_TS - 10)
    request["EVENT_ACTIONS"][1].append(5)
    third = call(env, server, "grpc", "infer", model="ensemble_model", requests=[request])[0]["outputs"]
    assert third["CACHE"] == ["partial"] and third["CACHED_TOKENS"] == first["outputs"]["COMPUTED_TOKENS"]
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as resp:
        metrics = resp.read().decode()
    counts = {line.split("}")[0].split('cache="')[1].rstrip('"'): float(line.split()[-1])
              for line in metrics.splitlines() if line.startswith("grinfer_triton_kv_cache_requests_total{")}
    assert counts["hit"] >= 1 and counts["partial"] >= 1 and counts["miss"] >= 1


BAD = [
    ("EVENT_ITEMS", lambda r: r["EVENT_ITEMS"][1].__setitem__(0, 987_654_321), "EVENT_ITEMS[0]: item 987654321"),
    ("CANDIDATE_ITEMS", lambda r: r["CANDIDATE_ITEMS"][1].append(r["CANDIDATE_ITEMS"][1][0]),
     "is already candidate 0"),
    ("EVENT_ACTIONS", lambda r: r["EVENT_ACTIONS"][1].__setitem__(0, 9), "EVENT_ACTIONS[0]: 9 is outside [1, 5]"),
    ("EVENT_TIMESTAMPS", lambda r: r["EVENT_TIMESTAMPS"][1].pop(), "EVENT_TIMESTAMPS, EVENT_ACTIONS"),
    ("USER_ID", lambda r: r["USER_ID"][1].__setitem__(0, "bad user!"), "USER_ID: user id must be"),
    ("PROFILE", lambda r: r["PROFILE"][1].__setitem__(0, 10_000), "PROFILE[0]: 10000 is outside"),
    ("NUM_STATIC", lambda r: r["NUM_STATIC"][1].__setitem__(0, 10_000), "NUM_STATIC: 10000 is outside"),
    ("missing", lambda r: r.pop("CANDIDATE_ITEMS"), "CANDIDATE_ITEMS: missing"),
    ("dtype", lambda r: r.__setitem__("EVENT_ACTIONS", ["FP32", r["EVENT_ACTIONS"][1]]),
     "EVENT_ACTIONS"),  # Triton's own check: the data type is not the config's
]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_inputs_get_tritons_error_and_the_server_stays_healthy(env, server, grinfer_side, protocol):
    user = grinfer_side.store.list_users(1, 2)[0]
    requests = []
    for _, spoil, _ in BAD:
        request = triton_request(grinfer_side, user, candidates_for(grinfer_side, 3))
        spoil(request)
        requests.append(request)
    good = triton_request(grinfer_side, user, candidates_for(grinfer_side, 3))
    answers = call(env, server, protocol, "infer", model="ensemble_model", requests=[*requests, good])
    for (field, _, message), answer in zip(BAD, answers):
        assert "error" in answer, (field, answer)
        assert message in answer["error"], (field, answer["error"])
        assert answer["status"] in ("400", "StatusCode.INVALID_ARGUMENT"), (field, answer)
    assert "outputs" in answers[-1]
    assert server.ready() and server.proc.poll() is None


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_health_and_model_statistics(env, server, grinfer_side, protocol):
    health = call(env, server, protocol, "health", models=MODELS)
    assert health == {"live": True, "ready": True, "models": dict.fromkeys(MODELS, True)}
    with urllib.request.urlopen(f"http://{server.http_url}/v2/health/ready", timeout=10) as resp:
        assert resp.status == 200
    before = call(env, server, protocol, "stats", model="gr_model")["model_stats"][0]
    user = grinfer_side.store.list_users(1, 4)[0]
    call(env, server, protocol, "infer", model="ensemble_model",
         requests=[triton_request(grinfer_side, user, candidates_for(grinfer_side, 1))])
    after = call(env, server, protocol, "stats", model="gr_model")["model_stats"][0]
    success = lambda s: int(s["inference_stats"]["success"].get("count", 0))
    assert success(after) == success(before) + 1
    ensemble = call(env, server, protocol, "stats", model="ensemble_model")["model_stats"][0]
    assert ensemble["name"] == "ensemble_model" and success(ensemble) >= 1


def test_concurrent_users_share_engine_batches(env, server, grinfer_side):
    """8 client threads at once: Triton's batcher hands gr_model's one instance several requests per
    execution (batch_stats); afterwards each user's context is a cache hit and its answer ranks its own
    candidates."""
    users = grinfer_side.store.list_users(8, 8)
    requests = [triton_request(grinfer_side, u, candidates_for(grinfer_side, 20 + i)) for i, u in enumerate(users)]
    call(env, server, "grpc", "load", model="ensemble_model", requests=requests, clients=8, rounds=4)
    stats = call(env, server, "http", "stats", model="gr_model")["model_stats"][0]
    sizes = {int(b["batch_size"]) for b in stats["batch_stats"]}
    assert max(sizes) > 1, stats["batch_stats"]
    again = call(env, server, "http", "infer", model="ensemble_model", requests=requests)
    for request, answer in zip(requests, again):
        assert answer["outputs"]["CACHE"] == ["hit"]
        assert sorted(answer["outputs"]["ITEMS"]) == sorted(request["CANDIDATE_ITEMS"][1])
