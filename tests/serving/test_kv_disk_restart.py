"""The KV cache's disk tier survives a restart of the real server: users ranked before `kill -TERM` are
KV-cache hits (from disk) on the next start, with the same scores."""

from __future__ import annotations

import os

import httpx

from grinfer.bench.served import ServedProcess
from grinfer.data import load_dataset

SPEC = "synthetic:users=20,items=60,events=15,seed=0"
USERS = 6


def serve(model, tmp_path, name: str) -> ServedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRINFER_")}
    env["GRINFER_HOME"] = str(tmp_path / "home")
    store = f"sqlite:///{tmp_path / 'grinfer.db'}"
    return ServedProcess(["--backend", "eager", "--model", str(model), "--store", store, "--device", "cpu",
                          "--kv-disk-mb", "64"], tmp_path / f"{name}.log", env=env)


def rank_all(url: str, users: list[str], items: list[int]) -> dict[str, dict]:
    out = {}
    with httpx.Client(base_url=url, timeout=30, trust_env=False) as http:
        for user in users:
            r = http.post("/v1/rank", json={"user": user, "candidates": [{"item": i} for i in items]})
            assert r.status_code == 200, r.text
            out[user] = r.json()
    return out


def test_warm_users_are_disk_hits_after_a_restart(served_checkpoint, tmp_path):
    ds = load_dataset(SPEC)
    users = [str(u.user_id) for u in ds.users[:USERS]]
    items = [int(x) for x in ds.catalog.raw_ids[1:21]]
    first = serve(served_checkpoint, tmp_path, "first")
    try:
        first.wait_ready(120)
        before = rank_all(first.url, users, items)
        assert {r["cache"] for r in before.values()} == {"miss"}
    finally:
        first.stop()
    kv_files = list((tmp_path / "home" / "kv").rglob("*.kv"))
    assert len(kv_files) >= USERS, f"{len(kv_files)} K/V files after the shutdown"
    second = serve(served_checkpoint, tmp_path, "second")
    try:
        second.wait_ready(120)
        after = rank_all(second.url, users, items)
        metrics = httpx.get(f"{second.url}/metrics", timeout=10, trust_env=False).text
    finally:
        second.stop()
    for user in users:
        assert after[user]["cache"] == "hit", (user, after[user]["cache"], second.log_tail())
        scores = {r["item"]: r["score"] for r in after[user]["items"]}
        for r in before[user]["items"]:
            assert abs(scores[r["item"]] - r["score"]) <= 1e-5
    disk_hits = [line for line in metrics.splitlines() if line.startswith("grinfer_kv_cache_disk_hits")]
    assert disk_hits and float(disk_hits[0].split()[-1]) >= USERS, disk_hits
