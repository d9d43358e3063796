"""The serving sweep (`python -m grinfer.bench.serve_sweep`) end to end on the CPU: it starts the real
`grinfer serve` subprocess, loads both endpoints at each client count, stops it, and reports; a server
that cannot start is reported as a failed backend. No timing assertions."""

from __future__ import annotations

import json

import pytest

from grinfer.bench.serve_sweep import counter_deltas, main, mean_batch, metric_samples, parse_sweep


def test_cpu_sweep_reports_every_level(served_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["--device", "cpu", "--backends", "eager", "--clients", "1,2", "--duration", "1",
                 "--model", str(served_checkpoint), "--out", str(out), "--ready-timeout", "120"])
    assert code == 0
    report = json.loads((out / "serve_sweep.json").read_text())
    assert report["gpu"] is None
    (backend,) = report["backends"]
    assert backend["error"] is None and backend["ready_s"] > 0
    assert backend["exit_code"] in (0, -15)  # uvicorn re-raises SIGTERM after its clean shutdown
    assert set(backend["first_request_ms"]) == {"rank", "recommend"}
    assert all(ms > 0 for ms in backend["first_request_ms"].values())
    rows = backend["rows"]
    assert [(r["endpoint"], r["clients"]) for r in rows] == [("rank", 1), ("rank", 2), ("recommend", 1),
                                                             ("recommend", 2)]
    for r in rows:
        assert r["ok"] > 0 and r["errors"] == {} and r["requests"] == r["ok"]
        assert r["ok_per_s"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"]
        assert r["gpu"] is None and r["mean_batch"] >= 1
        # the server counted at least the level's answers on that endpoint (its own /metrics, before/after)
        counted = sum(v for k, v in r["metrics_delta"].items()
                      if k.startswith("grinfer_request_seconds_count") and f'endpoint="/v1/{r["endpoint"]}"' in k)
        assert counted >= r["ok"]
    assert (out / "serve_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "grinfer_request_seconds" in (out / "metrics-eager-after.txt").read_text()
    table = capsys.readouterr().out
    assert "n/a" in table and "eager" in table and "recommend" in table
    assert "stopped by SIGTERM" in table or "exit code 0" in table


def test_a_server_that_cannot_start_is_a_failed_backend(tmp_path, capsys):
    out = tmp_path / "out"
    empty = tmp_path / "no-model"
    empty.mkdir()
    code = main(["--device", "cpu", "--backends", "eager", "--clients", "1", "--duration", "1",
                 "--model", str(empty), "--out", str(out), "--ready-timeout", "60"])
    assert code == 1
    (backend,) = json.loads((out / "serve_sweep.json").read_text())["backends"]
    assert backend["rows"] == [] and "exited with code 2" in backend["error"]
    assert "holds no checkpoint" in backend["error"]  # the server's own message, from its log
    assert "FAILED" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--backends", "eager,turbo"], "--backends"),
    (["--endpoints", ""], "--endpoints"),
    (["--clients", "0"], "--clients"),
    (["--duration", "0"], "--duration"),
    (["--device", "cuda:x"], "--device"),
])
def test_bad_flags_exit_2_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_sweep(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err.splitlines()[-1]


def test_defaults_are_the_gpu_sweep():
    sweep = parse_sweep([])
    assert sweep.backends == ["eager", "compiled", "fused"] and sweep.clients == [1, 8, 32, 64]
    assert sweep.endpoints == ["rank", "recommend"] and sweep.candidates == 100 and sweep.device == "cuda"
    assert sweep.levels == 24 and sweep.estimate_s() > 24 * sweep.duration_s


PAGE_BEFORE = """# HELP grinfer_batch_requests Requests per engine step
grinfer_batch_requests_count 10.0
grinfer_batch_requests_sum 15.0
grinfer_errors_total{endpoint="rank",kind="overload"} 1.0
grinfer_kv_cache_hits 4.0
python_gc_objects_collected_total{generation="0"} 100.0
"""
PAGE_AFTER = """grinfer_batch_requests_count 14.0
grinfer_batch_requests_sum 27.0
grinfer_errors_total{endpoint="rank",kind="overload"} 1.0
grinfer_errors_total{endpoint="recommend",kind="internal"} 2.0
grinfer_kv_cache_hits 9.0
python_gc_objects_collected_total{generation="0"} 180.0
"""


def test_metric_deltas_keep_grown_grinfer_counters_only():
    deltas = counter_deltas(metric_samples(PAGE_BEFORE), metric_samples(PAGE_AFTER))
    assert deltas == {"grinfer_batch_requests_count": 4.0, "grinfer_batch_requests_sum": 12.0,
                      'grinfer_errors_total{endpoint="recommend",kind="internal"}': 2.0}
    assert mean_batch(deltas) == 3.0
    assert mean_batch({}) is None


def test_host_cpu_busy_is_a_percentage_of_the_jiffies_between_two_readings():
    from grinfer.bench.serve_sweep import cpu_busy_pct

    assert cpu_busy_pct((100.0, 400.0), (250.0, 600.0)) == 75.0
    assert cpu_busy_pct(None, (1.0, 2.0)) is None and cpu_busy_pct((5.0, 10.0), (5.0, 10.0)) is None
