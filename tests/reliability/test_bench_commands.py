"""The overload and soak bench commands' arithmetic and command lines (their runs against a real server are
benchmarks, not tests: see BENCHMARKS.md's reliability section)."""

from __future__ import annotations

import pytest

from grinfer.bench import overload, soak
from grinfer.bench.load import LevelResult


def _level(clients: int, ok_per_s: float, errors: dict | None = None, p99: float = 10.0,
           p99_429: float | None = 1.0) -> LevelResult:
    return LevelResult(clients=clients, requests=int(ok_per_s * 10) + 5, ok=int(ok_per_s * 10), rejected_429=5,
                       errors=errors or {}, seconds=10.0, p50_ms=p99 / 2, p90_ms=p99, p99_ms=p99,
                       ok_per_s=ok_per_s, requests_per_s=ok_per_s + 0.5, rejected_p50_ms=p99_429,
                       rejected_p99_ms=p99_429)


def test_the_overload_summary_judges_the_levels_past_the_peak():
    levels = [_level(1, 10), _level(2, 50, p99=30), _level(4, 45, p99=80),
              _level(8, 40, {"503": 1}, p99=60, p99_429=7.0)]
    rows = [overload.level_row(r, 50) for r in levels]
    assert [r["goodput_vs_peak"] for r in rows] == [0.2, 1.0, 0.9, 0.8] and rows[0]["rejected_per_s"] == 0.5
    total = overload.summary(rows, target_ms=500)
    assert total["peak_ok_per_s"] == 50 and total["peak_clients"] == 2 and total["levels_past_peak"] == [4, 8]
    assert total["min_goodput_vs_peak"] == pytest.approx(0.8)
    assert total["max_ok_p99_ms"] == 80 and total["max_429_p99_ms"] == 7.0
    assert total["only_200_and_429_past_peak"] is False  # the 503 at 8 clients
    assert overload.summary(rows[:3], 500)["only_200_and_429_past_peak"] is True
    assert "peak 50.0 ok/s at 2 clients" in overload.format_table(rows, total)


@pytest.mark.parametrize("argv", [["--clients", "0"], ["--duration", "0"], ["--backoff", "-1"],
                                  ["--latency-target-ms", "0"], ["--endpoint", "users"]])
def test_overload_rejects_bad_arguments_with_exit_code_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        overload.parse_args(argv)
    assert info.value.code == 2 and argv[0] in capsys.readouterr().err


def test_the_soak_counts_series_and_compares_first_and_last_samples():
    page = "# HELP a x\n# TYPE a counter\na_total 1\nb{route=\"/v1/rank\"} 2\n\nb{route=\"/v1/recommend\"} 3\n"
    assert soak.series_count(page) == 3
    rows = [{"minute": m, "ok": 10, "rejected": 1, "errors": {"503": m - 1}, "ok_per_s": 1.0, "p50_ms": 5.0,
             "p99_ms": 9.0 + m, "rss_mib": 100.0 + m, "series": 300} for m in (1, 2, 3)]
    total = soak.summary(rows)
    assert (total["ok"], total["rejected"], total["errors"]) == (30, 3, 3)
    assert (total["rss_first_mib"], total["rss_last_mib"], total["p99_max_ms"]) == (101.0, 103.0, 12.0)
    assert "series 300 -> 300" in soak.format_table(rows, total)


@pytest.mark.parametrize("argv", [["--minutes", "0"], ["--minutes", "121"], ["--clients", "0"],
                                  ["--minutes", "1", "--interval", "61"]])
def test_soak_rejects_bad_arguments_with_exit_code_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        soak.parse_args(argv)
    assert info.value.code == 2 and argv[-2] in capsys.readouterr().err
