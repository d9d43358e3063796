"""Soak test (`python -m grinfer.bench.soak --minutes 30`): a long steady load, sampled every minute.

Starts a real `grinfer serve --backend eager` (served.py) and runs the closed-loop load of
`grinfer.bench.load` against it for `--minutes` (at most MAX_MINUTES), one level per sample interval.
After each interval it records the server's resident memory (RSS, from /proc), the interval's OK
answers, other outcomes, p50 / p99, and the number of metric series /metrics exports. Flat is the
goal: memory, latency and series that keep growing under a steady load are leaks. Prints one table
and a summary (first sample against last), writes soak.json and soak.png (and the server's log).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from grinfer.bench.figure import panels
from grinfer.bench.load import ENDPOINTS, MAX_CLIENTS, MAX_REQUESTS, prepare, run_level
from grinfer.bench.served import ServedProcess, report_main, served

MAX_MINUTES = 120


@dataclass(frozen=True)
class Soak:
    """What to run: `clients` closed loops for `minutes`, sampled every `interval_s`."""

    minutes: float
    out: Path
    clients: int = 8
    interval_s: float = 60.0
    endpoint: str = "recommend"
    ready_timeout_s: float = 900.0

    @property
    def samples(self) -> int:
        return max(1, round(self.minutes * 60 / self.interval_s))


def rss_mib(pid: int) -> float:
    """Resident memory of process `pid` in MiB (VmRSS in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/{pid}/status has no VmRSS line")


def series_count(text: str) -> int:
    """Metric series on a Prometheus text page: its sample lines (comments and blank lines skipped)."""
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


async def sample_loop(plan: Soak, server: ServedProcess) -> list[dict]:
    """One closed-loop level per interval; after each, the server's RSS and series count."""
    limits = httpx.Limits(max_connections=plan.clients, max_keepalive_connections=plan.clients)
    async with httpx.AsyncClient(base_url=server.url, timeout=60.0, limits=limits, trust_env=False,
                                 follow_redirects=False) as client:
        workload = await prepare(client, plan.endpoint, 100, 10, 0)
        rows = []
        for i in range(plan.samples):
            level = await run_level(client, workload, plan.clients, MAX_REQUESTS, plan.interval_s)
            page = (await client.get("/metrics")).text
            rows.append({"minute": (i + 1) * plan.interval_s / 60, "ok": level.ok, "rejected": level.rejected_429,
                         "errors": level.errors, "ok_per_s": level.ok_per_s, "p50_ms": level.p50_ms,
                         "p99_ms": level.p99_ms, "rss_mib": rss_mib(server.proc.pid), "series": series_count(page)})
            print(f"  {format_row(rows[-1])}", file=sys.stderr, flush=True)
        return rows


def summary(rows: list[dict]) -> dict:
    """First sample against the last: RSS, series and p99 growth, and failures over the whole run."""
    first, last = rows[0], rows[-1]
    return {"minutes": last["minute"], "ok": sum(r["ok"] for r in rows), "rejected": sum(r["rejected"] for r in rows),
            "errors": sum(sum(r["errors"].values()) for r in rows),
            "rss_first_mib": first["rss_mib"], "rss_last_mib": last["rss_mib"],
            "rss_max_mib": max(r["rss_mib"] for r in rows), "series_first": first["series"],
            "series_last": last["series"], "p99_first_ms": first["p99_ms"], "p99_last_ms": last["p99_ms"],
            "p99_max_ms": max((r["p99_ms"] for r in rows if r["p99_ms"] is not None), default=None)}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_row(r: dict) -> str:
    other = ",".join(f"{k}:{v}" for k, v in sorted(r["errors"].items())) or "0"
    return (f"{r['minute']:>6.1f} {r['ok']:>7} {r['rejected']:>5} {other:>10} {r['ok_per_s']:>7.1f} "
            f"{_ms(r['p50_ms']):>8} {_ms(r['p99_ms']):>8} {r['rss_mib']:>8.1f} {r['series']:>7}")


def format_table(rows: list[dict], total: dict) -> str:
    head = (f"{'minute':>6} {'ok':>7} {'429':>5} {'other':>10} {'ok/s':>7} {'p50 ms':>8} {'p99 ms':>8} "
            f"{'RSS MiB':>8} {'series':>7}")
    return "\n".join([head, *(format_row(r) for r in rows),
                      f"{total['minutes']:g} min: {total['ok']} ok, {total['rejected']} x 429, "
                      f"{total['errors']} other; "
                      f"RSS {total['rss_first_mib']:.1f} -> {total['rss_last_mib']:.1f} MiB (max "
                      f"{total['rss_max_mib']:.1f}); series {total['series_first']} -> {total['series_last']}; "
                      f"p99 {_ms(total['p99_first_ms'])} -> {_ms(total['p99_last_ms'])} ms (max "
                      f"{_ms(total['p99_max_ms'])})"])


def plot(rows: list[dict], path: Path) -> None:
    """RSS, p99 and series count against time."""
    minutes = [r["minute"] for r in rows]
    with panels(path, 3, (14, 4)) as (rss, p99, series):
        rss.plot(minutes, [r["rss_mib"] for r in rows], "o-")
        rss.set_ylabel("server RSS (MiB)")
        p99.plot(minutes, [float("nan") if r["p99_ms"] is None else r["p99_ms"] for r in rows], "o-")
        p99.set_ylabel("p99 of OK answers (ms)")
        series.plot(minutes, [r["series"] for r in rows], "o-")
        series.set_ylabel("metric series on /metrics")
        for ax in (rss, p99, series):
            ax.set_xlabel("minutes")
            ax.set_ylim(bottom=0)


def run_soak(plan: Soak) -> dict:
    """Start the server, load and sample it, stop it; the report (also written as soak.json + soak.png)."""
    with served(["--backend", "eager"], plan.out, plan.ready_timeout_s) as server:  # GRINFER_* set the rest
        rows = asyncio.run(sample_loop(plan, server))
    report = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(plan).items()},
              "samples": rows, "summary": summary(rows)}
    (plan.out / "soak.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, plan.out / "soak.png")
    return report


def parse_args(argv: list[str] | None = None) -> Soak:
    """The command line as a Soak plan; argparse's exit code 2 with one message line on a bad value."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help=f"how long (at most {MAX_MINUTES}) [30]")
    parser.add_argument("--clients", type=int, default=8, help="closed-loop clients [8]")
    parser.add_argument("--interval", type=float, default=60.0, help="seconds between samples [60]")
    parser.add_argument("--endpoint", default="recommend", choices=ENDPOINTS, help="[recommend]")
    parser.add_argument("--ready-timeout", type=float, default=900.0, help="seconds to wait for /readyz [900]")
    parser.add_argument("--out", type=Path, default=Path("runs/soak"), help="output dir [runs/soak]")
    args = parser.parse_args(argv)
    if not 0 < args.minutes <= MAX_MINUTES:
        parser.error(f"--minutes must be in (0, {MAX_MINUTES}], got {args.minutes:g}")
    if not 1 <= args.clients <= MAX_CLIENTS:
        parser.error(f"--clients must be between 1 and {MAX_CLIENTS}, got {args.clients}")
    if not 1 <= args.interval <= args.minutes * 60:
        parser.error(f"--interval must be between 1 s and the run's length, got {args.interval:g}")
    return Soak(minutes=args.minutes, out=args.out, clients=args.clients, interval_s=args.interval,
                endpoint=args.endpoint, ready_timeout_s=args.ready_timeout)


def main(argv: list[str] | None = None) -> int:
    plan = parse_args(argv)
    return report_main("soak", lambda: run_soak(plan), lambda r: format_table(r["samples"], r["summary"]),
                       [plan.out / "soak.json", plan.out / "soak.png"])


if __name__ == "__main__":
    sys.exit(main())
