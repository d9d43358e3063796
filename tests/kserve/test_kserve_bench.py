"""`grinfer bench --server --protocol P`: the same closed-loop load over REST, grinfer's gRPC and KServe v2
(HTTP and gRPC) on a live server, every request answered; bad protocol settings are one clear error."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import httpx
import pytest
from typer.testing import CliRunner

from grinfer.bench import protocol_sweep
from grinfer.bench.cpu import process_tree_cpu_s
from grinfer.bench.load import run_load
from grinfer.bench.protocols import triton_contexts, triton_inputs
from grinfer.cli import app


@pytest.mark.parametrize("protocol", ["rest", "grpc", "kserve-http", "kserve-grpc"])
@pytest.mark.parametrize("endpoint", ["rank", "recommend"])
def test_every_protocol_carries_the_load(live, protocol, endpoint):
    (level,) = run_load(live.url, [3], endpoint=endpoint, requests=12, duration_s=120, candidates=5,
                        protocol=protocol, grpc_target=f"127.0.0.1:{live.grpc.port}")
    assert level.ok == 12 and level.errors == {} and level.rejected_429 == 0
    assert level.p50_ms is not None and level.p99_ms >= level.p50_ms
    caches = {cache for statuses in level.replicas.values() for cache in statuses}
    assert caches <= {"hit", "partial", "miss", "none"} and sum(
        n for statuses in level.replicas.values() for n in statuses.values()) == 12


@pytest.mark.parametrize("kwargs, message", [
    ({"protocol": "soap"}, "--protocol must be one of rest, grpc, kserve-http, kserve-grpc, triton"),
    ({"protocol": "grpc"}, "--protocol grpc needs --grpc-target HOST:PORT"),
    ({"protocol": "kserve-grpc", "grpc_target": "10.1.2.3:50051"}, "only loopback addresses"),
    ({"protocol": "kserve-grpc", "grpc_target": "127.0.0.1"}, "--grpc-target must be HOST:PORT"),
    ({"protocol": "triton"}, "--protocol triton needs --triton-url"),
    ({"protocol": "triton", "endpoint": "recommend", "triton_url": "http://127.0.0.1:1"}, "use --endpoint rank"),
    ({"protocol": "triton", "triton_url": "http://192.0.2.1:8000"}, "only loopback addresses"),
])
def test_bad_protocol_settings_are_one_clear_error(live, kwargs, message):
    kwargs = {"endpoint": "rank", **kwargs}
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        run_load(live.url, [1], requests=1, duration_s=5, **kwargs)


def test_cli_runs_a_protocol_and_names_it(live, tmp_path):
    out = tmp_path / "kserve.json"
    result = CliRunner().invoke(app, ["bench", "--server", live.url, "--endpoint", "rank", "--protocol",
                                      "kserve-grpc", "--grpc-target", f"127.0.0.1:{live.grpc.port}", "--clients",
                                      "2", "--requests", "6", "--candidates", "4", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "rank over kserve-grpc on" in result.output
    report = json.loads(out.read_text())
    assert report["settings"]["protocol"] == "kserve-grpc" and report["levels"][0]["ok"] == 6
    bad = CliRunner().invoke(app, ["bench", "--server", live.url, "--protocol", "grpc"])
    assert bad.exit_code == 2 and "--protocol grpc needs --grpc-target" in bad.output


def test_triton_contexts_carry_the_users_whole_context(live):
    async def fetch():
        async with httpx.AsyncClient(base_url=live.url) as client:
            return await triton_contexts(client, [live.user()])
    context = asyncio.run(fetch())[live.user()]
    record = live.store.get_user(live.user())
    events = record.static + record.realtime
    assert context["items"] == [live.raw_item(e.item) for e in events] and len(events) > 0
    assert context["ts"] == [e.ts for e in events] and context["num_static"] == len(record.static)
    tensors = {t["name"]: t for t in triton_inputs({live.user(): context})({"user": live.user(),
                                                                            "candidates": [{"item": 7}]})}
    assert tensors["CANDIDATE_ITEMS"]["data"] == [7] and tensors["USER_ID"]["data"] == [live.user()]
    assert live.http.get(f"/v1/users/{live.user()}", params={"recent": 0}).status_code == 422


def test_protocol_sweep_prints_the_table_and_writes_json_and_png(live, tmp_path, capsys):
    out = tmp_path / "sweep.json"
    assert protocol_sweep.main(["--server", live.url, "--grpc-target", f"127.0.0.1:{live.grpc.port}", "--rounds",
                                "2", "--requests", "4", "--clients", "1,2", "--candidates", "3",
                                "--server-pid", str(os.getpid()), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert all(p in table for p in ("rest", "grpc", "kserve-http", "kserve-grpc")) and "triton" not in table
    report = json.loads(out.read_text())
    assert len(report["summary"]) == 8 and all(r["rounds"] == 2 and r["failed"] == 0 for r in report["summary"])
    assert len(report["rounds"]["kserve-http"]) == 2 and out.with_suffix(".png").stat().st_size > 0
    assert [r["protocol"] for r in report["cpu"]] == ["rest", "grpc", "kserve-http", "kserve-grpc"]
    assert all(r["grinfer cpu ms/req"] > 0 and r["load generator cpu ms/req"] > 0 for r in report["cpu"])
    assert protocol_sweep.main(["--server", "http://10.0.0.1:8000", "--out", str(out)]) == 2


def test_process_tree_cpu_counts_live_children():
    burn = "import time, sys\nwhile time.process_time() < 0.3: pass\nprint('burnt', flush=True)\ntime.sleep(60)"
    start = process_tree_cpu_s(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", burn], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "burnt"  # 0.3 s of the child's own CPU, and it lives on
        assert process_tree_cpu_s(os.getpid()) - start >= 0.25  # /proc counts in clock ticks
    finally:
        child.kill()
        child.wait()
    with pytest.raises(ValueError, match="no process"):
        process_tree_cpu_s(2**22 + 1)
