"""Real `grinfer serve --model-name` servers on loopback: three consecutive swaps under closed-loop load
answer every request (SQLite), and the CLI's experiment and promotion reach a polling server (PostgreSQL)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from grinfer.bench.swaps import SETTINGS, make_versions, run_swaps, serve_registered
from grinfer.registry import Arm, assign


def metric(page: str, name: str, labels: str) -> float:
    """The value of one sample of a Prometheus text page."""
    line = next(line for line in page.splitlines() if line.startswith(f"{name}{{{labels}}} "))
    return float(line.split()[-1])


def wait_for(probe, timeout_s: float = 60.0):
    """probe()'s first truthy value, polled until `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"not reached within {timeout_s} s")


def models(cli_args: list[str]) -> str:
    done = subprocess.run([sys.executable, "-m", "grinfer.cli", "models", *cli_args], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_three_swaps_under_closed_loop_load_answer_every_request(tmp_path: Path, store_url: str):
    paths = make_versions(tmp_path / "models", 4)
    served = serve_registered(paths, store_url, tmp_path, settings={**SETTINGS, "GRINFER_CONSISTENCY_SAMPLE": "0.2"})
    try:
        windows = asyncio.run(run_swaps(served.url, "ranker", [2, 3, 4], clients=3, settle_s=1.0))
        assert [w.non_2xx for w in windows] == [{}] * 4
        assert all(w.requests > 0 and w.load_s is not None for w in windows[1:])
        with httpx.Client(base_url=served.url, trust_env=False, timeout=30) as client:
            arms = {a["model_version"]: a for a in client.get("/v1/admin/arms").json()["arms"]}
            assert set(arms) == {f"ranker:{v}" for v in (1, 2, 3, 4)}
            assert all(a["requests"] > 0 and a["errors"] == 0 for a in arms.values())
            served_now = client.get("/v1/admin/models").json()["served"]
            assert served_now["plan"]["production"] == "ranker:4"
            assert [v["model_version"] for v in served_now["versions"]] == ["ranker:4"]
            user = client.get("/v1/users", params={"limit": 1}).json()["users"][0]
            item = client.get(f"/v1/users/{user}").json()["recent"][0]["item"]
            r = client.post("/v1/rank", json={"user": user, "candidates": [{"item": item}]})
            assert (r.json()["arm"], r.json()["model_version"]) == ("production", "ranker:4")
            assert (r.headers["x-grinfer-arm"], r.headers["x-grinfer-model-version"]) == ("production", "ranker:4")
            forced = client.post("/v1/rank", json={"user": user, "candidates": [{"item": item}]},
                                 headers={"X-Grinfer-Arm": "treatment"})
            assert forced.status_code == 422 and forced.json()["field"] == "arm"
            page = client.get("/metrics").text
            assert metric(page, "grinfer_kv_consistency_checks_total", 'model_version="ranker:4"') > 0
            assert metric(page, "grinfer_kv_consistency_exceeded_total", 'model_version="ranker:4"') == 0
            assert metric(page, "grinfer_arm_requests_total", 'arm="production",model_version="ranker:1"') > 0
    finally:
        served.stop()


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
def test_cli_experiment_and_promotion_reach_a_polling_server(tmp_path: Path, store_url: str):
    paths = make_versions(tmp_path / "models", 3)
    served = serve_registered(paths, store_url, tmp_path, settings={**SETTINGS, "GRINFER_REGISTRY_POLL_S": "0.5"})
    try:
        with httpx.Client(base_url=served.url, trust_env=False, timeout=30) as client:
            def plan() -> dict:
                return client.get("/v1/admin/models").json()["served"]["plan"]

            models(["experiment", "ab", "--model", "ranker", "--arm", "control=0.5", "--arm", "treatment=0.5@2",
                    "--store", store_url])
            wait_for(lambda: plan()["experiment"] == "ab")
            arms = [Arm("control", 0.5), Arm("treatment", 0.5, 2)]
            users = client.get("/v1/users", params={"limit": 20}).json()["users"]
            item = client.get(f"/v1/users/{users[0]}").json()["recent"][0]["item"]
            for _ in range(2):  # every user sticks to the arm the hash gives them
                for user in users:
                    body = client.post("/v1/rank", json={"user": user, "candidates": [{"item": item}]}).json()
                    expected = assign("ab", user, arms).name
                    assert (body["arm"], body["model_version"]) == (
                        expected, "ranker:1" if expected == "control" else "ranker:2")
            assert "experiment ab on ranker (running)" in models(["list", "--store", store_url])
            models(["promote", "ranker", "3", "--store", store_url])
            wait_for(lambda: plan()["production"] == "ranker:3")
            assert [a["model_version"] for a in plan()["arms"]] == ["ranker:3", "ranker:2"]  # control follows
            models(["stop", "ab", "--store", store_url])
            wait_for(lambda: plan()["experiment"] is None)
            report = models(["report", "--server", served.url])
            assert "treatment" in report and "ranker:2" in report
    finally:
        served.stop()


def test_a_changed_production_checkpoint_refuses_to_serve(tmp_path: Path):
    store = f"sqlite://{tmp_path}/store.db"
    [path] = make_versions(tmp_path / "models", 1)
    models(["register", str(path), "--name", "ranker", "--store", store])
    models(["promote", "ranker", "1", "--store", store])
    (path / "config.json").write_text((path / "config.json").read_text() + " ")
    done = subprocess.run([sys.executable, "-m", "grinfer.cli", "serve", "--model-name", "ranker", "--store", store,
                           "--port", "0"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "refusing to load a checkpoint that changed" in done.stderr and len(done.stderr.splitlines()) == 1

