"""Protocol sweep (`python -m grinfer.bench.protocol_sweep --server URL --grpc-target HOST:PORT ...`).

The same closed-loop rank load (`grinfer bench --server --protocol P`) through every protocol, in
interleaved rounds (each round runs every protocol once, in a new seeded random order), so that a noisy,
shared machine disturbs each protocol alike; per protocol and client count it reports the median over
rounds of p50, p99 and OK answers per second (and the range of the latter). Before the rounds one
warm-up pass per cache (grinfer's, and the Triton server's when --triton-url is given) fills the KV caches,
so every protocol is measured warm. With --server-pid / --triton-pid it also reports the CPU milliseconds
each OK answer cost the servers (and the load generator): on a busy shared machine a steadier measure than
latency. Prints the tables; writes JSON and a PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

from grinfer.bench.cpu import own_cpu_s, process_tree_cpu_s
from grinfer.bench.figure import panels
from grinfer.bench.load import LevelResult, parse_clients, run_load
from grinfer.bench.protocols import PROTOCOLS


def sweep(server: str, protocols: list[str], clients: list[int], rounds: int, requests: int, candidates: int,
          pids: dict[str, int] | None = None, **targets) -> tuple[dict[str, list[list[LevelResult]]], list[dict]]:
    """{protocol: [per round: one LevelResult per client count]} after the warm-up passes, and per protocol
    and round the CPU milliseconds per OK answer of the load generator and of each process in `pids`."""
    kwargs = {"endpoint": "rank", "candidates": candidates, "duration_s": 120.0, **targets}
    for protocol in ("rest", "triton") if targets.get("triton_url") else ("rest",):
        run_load(server, [max(clients)], requests=3 * requests, protocol=protocol, **kwargs)
    out: dict[str, list[list[LevelResult]]] = {p: [] for p in protocols}
    cpu: list[dict] = []
    watched = {"load generator": own_cpu_s, **{name: (lambda pid=pid: process_tree_cpu_s(pid))
                                              for name, pid in (pids or {}).items()}}
    for r in range(rounds):
        order = list(protocols)
        random.Random(r).shuffle(order)  # a new order each round: no protocol always follows the same one
        for protocol in order:
            before = {name: read() for name, read in watched.items()}
            out[protocol].append(run_load(server, clients, requests=requests, protocol=protocol, **kwargs))
            ok = sum(lv.ok for lv in out[protocol][-1])
            cpu.append({"protocol": protocol, "round": r + 1, "ok": ok, **{
                f"{name} cpu ms/req": 1e3 * (read() - before[name]) / max(ok, 1) for name, read in watched.items()}})
            print(f"round {r + 1}/{rounds} {protocol}: " + ", ".join(
                f"{lv.clients}c {lv.ok_per_s:.0f}/s" for lv in out[protocol][-1]), file=sys.stderr, flush=True)
    return out, cpu


def cpu_summary(cpu: list[dict]) -> list[dict]:
    """Per protocol: the median over rounds of each CPU ms/req column."""
    rows = []
    for protocol in sorted({c["protocol"] for c in cpu}, key=PROTOCOLS.index):
        mine = [c for c in cpu if c["protocol"] == protocol]
        columns = [k for k in mine[0] if k.endswith("cpu ms/req")]
        rows.append({"protocol": protocol, **{k: statistics.median(c[k] for c in mine) for k in columns}})
    return rows


def format_cpu(rows: list[dict]) -> str:
    columns = [k for k in rows[0] if k != "protocol"]
    lines = [f"{'protocol':<12} " + " ".join(f"{c:>26}" for c in columns)]
    lines += [f"{r['protocol']:<12} " + " ".join(f"{r[c]:>26.2f}" for c in columns) for r in rows]
    return "\n".join(lines)


def summary(runs: dict[str, list[list[LevelResult]]]) -> list[dict]:
    """One row per protocol and client count: medians over rounds, the req/s range, failed requests."""
    rows = []
    for protocol, rounds in runs.items():
        for i, level in enumerate(rounds[0]):
            levels = [r[i] for r in rounds]
            rates = [lv.ok_per_s for lv in levels]
            rows.append({"protocol": protocol, "clients": level.clients, "rounds": len(levels),
                         "p50_ms": _median([lv.p50_ms for lv in levels]),
                         "p99_ms": _median([lv.p99_ms for lv in levels]),
                         "ok_per_s": statistics.median(rates), "ok_per_s_min": min(rates), "ok_per_s_max": max(rates),
                         "failed": sum(lv.requests - lv.ok for lv in levels)})
    return rows


def _median(values: list[float | None]) -> float | None:
    """The median of the values that exist (a level without OK answers has no latency); None if none do."""
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'protocol':<12} {'clients':>7} {'p50 ms':>8} {'p99 ms':>8} {'ok/s':>7} {'ok/s range':>13} "
             f"{'failed':>6}"]
    lines += [f"{r['protocol']:<12} {r['clients']:>7} {_ms(r['p50_ms']):>8} {_ms(r['p99_ms']):>8} "
              f"{r['ok_per_s']:>7.1f} {r['ok_per_s_min']:>6.1f}-{r['ok_per_s_max']:<6.1f} {r['failed']:>6}"
              for r in rows]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Median OK answers per second and median p50 against clients, one line per protocol."""
    with panels(path, 2, (10, 4)) as (rate, latency):
        for protocol in dict.fromkeys(r["protocol"] for r in rows):
            mine = [r for r in rows if r["protocol"] == protocol]
            clients = [r["clients"] for r in mine]
            rate.plot(clients, [r["ok_per_s"] for r in mine], "o-", label=protocol)
            latency.plot(clients, [r["p50_ms"] for r in mine], "o-", label=protocol)
        rate.set_ylabel("OK answers / s (median of rounds)")
        latency.set_ylabel("p50 latency ms (median of rounds)")
        levels = sorted({r["clients"] for r in rows})
        for ax in (rate, latency):
            ax.set_xlabel("concurrent clients")
            ax.set_xscale("log", base=2)
            ax.set_xticks(levels, [str(c) for c in levels])
            ax.legend(fontsize=8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    parser.add_argument("--server", required=True, help="grinfer's REST URL on loopback")
    parser.add_argument("--grpc-target", help="grinfer's gRPC HOST:PORT (for grpc, kserve-grpc)")
    parser.add_argument("--triton-url", help="a KServe v2 server's URL for the triton protocol (else it is left out)")
    parser.add_argument("--triton-model", default="ensemble_model")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=300, help="requests per level and round")
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--server-pid", type=int, help="the grinfer server's process id: its CPU per request")
    parser.add_argument("--triton-pid", type=int, help="the v2 server's process id (its children count too)")
    parser.add_argument("--out", type=Path, default=Path("protocol_sweep.json"))
    args = parser.parse_args(argv)
    protocols = [p for p in PROTOCOLS if p != "triton" or args.triton_url]
    load = {"before": os.getloadavg()}  # a shared machine: how busy it was says how far to trust the numbers
    try:
        pids = {name: pid for name, pid in (("grinfer", args.server_pid), ("triton", args.triton_pid)) if pid}
        for pid in pids.values():
            process_tree_cpu_s(pid)  # ValueError now, not after the warm-up
        runs, cpu = sweep(args.server, protocols, parse_clients([args.clients]), max(1, args.rounds), args.requests,
                          args.candidates, pids, grpc_target=args.grpc_target, triton_url=args.triton_url,
                          triton_model=args.triton_model)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    load["after"] = os.getloadavg()
    rows, cpu_rows = summary(runs), cpu_summary(cpu)
    print(format_rows(rows))
    print("\nCPU per OK answer, all levels of a round together (median of rounds):")
    print(format_cpu(cpu_rows))
    print("load average (1/5/15 min) before: {:.1f} {:.1f} {:.1f}, after: {:.1f} {:.1f} {:.1f}".format(
        *load["before"], *load["after"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    levels = {p: [[{k: v for k, v in asdict(lv).items() if k != "latencies_ms"} for lv in r] for r in rounds]
              for p, rounds in runs.items()}
    report = {"settings": {k: str(v) for k, v in vars(args).items()}, "load_average": load, "summary": rows,
              "cpu": cpu_rows, "cpu_rounds": cpu, "rounds": levels}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out}, {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
