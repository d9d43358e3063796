"""Overload sweep (`python -m grinfer.bench.overload`): load shedding at the door, measured.

Starts a real `grinfer serve --backend eager` (served.py), primes it with a short level, then runs the
closed-loop load of `grinfer.bench.load` at each client count in turn against /v1/recommend (or
/v1/rank). Per level: OK answers and 429s a second, p50 / p99 of the 200s and of the 429s, other
outcomes, and goodput (OK answers a second) against the sweep's peak. Past saturation the server should
answer only 200 or 429, keep its goodput near the peak, and answer a 429 in milliseconds.

By default a client that got a 429 sends its next request at once (as wrk does: the harshest closed
loop, every refused client comes straight back); `--backoff S` makes it wait S seconds first, as a
client honouring the server's Retry-After does. Prints one table, writes overload.json and
overload.png (and the server's log) under --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from grinfer.bench.figure import panels
from grinfer.bench.load import ENDPOINTS, MAX_DURATION_S, MAX_REQUESTS, LevelResult, parse_clients, prepare, run_level
from grinfer.bench.served import report_main, served
from grinfer.config import env_var

PRIME_S = 3.0  # a first level at the middle client count: warm caches and a measured service rate


@dataclass(frozen=True)
class Overload:
    """What to run: client counts against one server, each level for `duration_s`."""

    clients: list[int]
    duration_s: float
    out: Path
    endpoint: str = "recommend"
    latency_target_ms: int = 500
    backoff_s: float = 0.0
    candidates: int = 100
    ready_timeout_s: float = 900.0


def level_row(result: LevelResult, peak_ok_per_s: float) -> dict:
    """One level as a table / JSON row; goodput is OK answers a second over the sweep's peak."""
    return {"clients": result.clients, "requests": result.requests, "ok": result.ok, "rejected": result.rejected_429,
            "errors": result.errors, "seconds": result.seconds, "ok_per_s": result.ok_per_s,
            "rejected_per_s": result.rejected_429 / result.seconds, "p50_ms": result.p50_ms,
            "p99_ms": result.p99_ms, "rejected_p50_ms": result.rejected_p50_ms,
            "rejected_p99_ms": result.rejected_p99_ms,
            "goodput_vs_peak": result.ok_per_s / peak_ok_per_s if peak_ok_per_s else None}


def summary(rows: list[dict], target_ms: int) -> dict:
    """The figures the issue asks for, over the levels past the peak (saturation): the lowest goodput
    against the peak, the worst 200 and 429 p99s, and whether anything but 200 / 429 was answered."""
    peak_at = max(range(len(rows)), key=lambda i: rows[i]["ok_per_s"]) if rows else 0
    past = rows[peak_at + 1:]
    worst = lambda key: max((r[key] for r in past if r[key] is not None), default=None)
    return {"peak_ok_per_s": rows[peak_at]["ok_per_s"] if rows else None,
            "peak_clients": rows[peak_at]["clients"] if rows else None,
            "levels_past_peak": [r["clients"] for r in past],
            "min_goodput_vs_peak": min((r["goodput_vs_peak"] for r in past), default=None),
            "max_ok_p99_ms": worst("p99_ms"), "max_429_p99_ms": worst("rejected_p99_ms"),
            "latency_target_ms": target_ms,
            "only_200_and_429_past_peak": all(not r["errors"] for r in past)}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_table(rows: list[dict], total: dict) -> str:
    head = (f"{'clients':>7} {'ok/s':>7} {'429/s':>7} {'other':>10} {'p50 ms':>8} {'p99 ms':>8} "
            f"{'429 p50':>8} {'429 p99':>8} {'goodput/peak':>12}")
    lines = [head]
    for r in rows:
        other = ",".join(f"{k}:{v}" for k, v in sorted(r["errors"].items())) or "0"
        good = "-" if r["goodput_vs_peak"] is None else f"{r['goodput_vs_peak']:.2f}"
        lines.append(f"{r['clients']:>7} {r['ok_per_s']:>7.1f} {r['rejected_per_s']:>7.1f} {other:>10} "
                     f"{_ms(r['p50_ms']):>8} {_ms(r['p99_ms']):>8} {_ms(r['rejected_p50_ms']):>8} "
                     f"{_ms(r['rejected_p99_ms']):>8} {good:>12}")
    low = total["min_goodput_vs_peak"]
    lines.append(f"peak {_ms(total['peak_ok_per_s'])} ok/s at {total['peak_clients']} clients; past it: goodput >= "
                 f"{'-' if low is None else f'{low:.2f}'} of the peak, 200 p99 <= {_ms(total['max_ok_p99_ms'])} ms "
                 f"(target {total['latency_target_ms']} ms), 429 p99 <= {_ms(total['max_429_p99_ms'])} ms, only "
                 f"200/429: {total['only_200_and_429_past_peak']}")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """OK and 429 answers a second, and p99 of each, against the number of concurrent clients."""
    clients = [r["clients"] for r in rows]
    nan = lambda v: float("nan") if v is None else v
    with panels(path, 2, (10, 4)) as (rate, latency):
        rate.plot(clients, [r["ok_per_s"] for r in rows], "o-", label="200 / s")
        rate.plot(clients, [r["rejected_per_s"] for r in rows], "s--", label="429 / s")
        rate.set_ylabel("answers / s")
        latency.plot(clients, [nan(r["p99_ms"]) for r in rows], "o-", label="200 p99")
        latency.plot(clients, [nan(r["rejected_p99_ms"]) for r in rows], "s--", label="429 p99")
        latency.set_ylabel("latency (ms)")
        latency.set_yscale("log")
        for ax in (rate, latency):
            ax.set_xlabel("concurrent clients")
            ax.set_xscale("log", base=2)
            ax.set_xticks(clients, [str(c) for c in clients])
            ax.set_title(title, fontsize=9)
            ax.legend(fontsize=8)


async def sweep_levels(plan: Overload, url: str) -> list[LevelResult]:
    """The priming level (not reported), then every client level against the ready server at `url`."""
    width = max(plan.clients)
    limits = httpx.Limits(max_connections=width, max_keepalive_connections=width)
    async with httpx.AsyncClient(base_url=url, timeout=60.0, limits=limits, trust_env=False,
                                 follow_redirects=False) as client:
        workload = await prepare(client, plan.endpoint, plan.candidates, 10, 0)
        await run_level(client, workload, plan.clients[len(plan.clients) // 2], MAX_REQUESTS, PRIME_S)
        results = []
        for n in plan.clients:
            results.append(await run_level(client, workload, n, MAX_REQUESTS, plan.duration_s,
                                           backoff_s=plan.backoff_s))
            print(f"  {n} clients: {results[-1].ok_per_s:.1f} ok/s, {results[-1].rejected_429} x 429",
                  file=sys.stderr, flush=True)
        return results


def run_overload(plan: Overload) -> dict:
    """Start the server, sweep, stop it; the report (also written as overload.json + overload.png)."""
    env = {**os.environ, env_var("latency_target_ms"): str(plan.latency_target_ms)}  # GRINFER_* set the rest
    with served(["--backend", "eager"], plan.out, plan.ready_timeout_s, env) as server:
        results = asyncio.run(sweep_levels(plan, server.url))
    peak = max(r.ok_per_s for r in results)
    rows = [level_row(r, peak) for r in results]
    report = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(plan).items()},
              "levels": rows, "summary": summary(rows, plan.latency_target_ms)}
    (plan.out / "overload.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, plan.out / "overload.png", f"/v1/{plan.endpoint}, target {plan.latency_target_ms} ms, "
                                          f"back-off {plan.backoff_s:g} s")
    return report


def parse_args(argv: list[str] | None = None) -> Overload:
    """The command line as an Overload plan; argparse's exit code 2 with one message line on a bad value."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--clients", default="1,2,4,8,16,32,64", help="client counts, comma-separated "
                                                                      "[1,2,4,8,16,32,64]")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per level [10]")
    parser.add_argument("--endpoint", default="recommend", choices=ENDPOINTS, help="[recommend]")
    parser.add_argument("--latency-target-ms", type=int, default=500, help="the server's admission target [500]")
    parser.add_argument("--backoff", type=float, default=0.0,
                        help="seconds a client waits after a 429 (the server's Retry-After is 1) [0: none]")
    parser.add_argument("--ready-timeout", type=float, default=900.0, help="seconds to wait for /readyz [900]")
    parser.add_argument("--out", type=Path, default=Path("runs/overload"), help="output dir [runs/overload]")
    args = parser.parse_args(argv)
    try:
        clients = parse_clients([args.clients])
    except ValueError as exc:
        parser.error(str(exc))
    if not 0 < args.duration <= MAX_DURATION_S:
        parser.error(f"--duration must be in (0, {MAX_DURATION_S:g}] seconds, got {args.duration}")
    if args.latency_target_ms < 1:
        parser.error(f"--latency-target-ms must be >= 1, got {args.latency_target_ms}")
    if not 0 <= args.backoff <= 60:
        parser.error(f"--backoff must be between 0 and 60 seconds, got {args.backoff}")
    return Overload(clients=clients, duration_s=args.duration, out=args.out, endpoint=args.endpoint,
                    latency_target_ms=args.latency_target_ms, backoff_s=args.backoff,
                    ready_timeout_s=args.ready_timeout)


def main(argv: list[str] | None = None) -> int:
    plan = parse_args(argv)
    return report_main("overload", lambda: run_overload(plan), lambda r: format_table(r["levels"], r["summary"]),
                       [plan.out / "overload.json", plan.out / "overload.png"])


if __name__ == "__main__":
    sys.exit(main())
