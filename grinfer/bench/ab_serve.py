"""Two builds of the server side by side: the same model, store and load against the tree of another
checkout (the baseline, e.g. the previous commit in a `git worktree`) and against this one.

    git worktree add /tmp/prev HEAD~1
    python -m grinfer.bench.ab_serve --baseline-src /tmp/prev --endpoint recommend --clients 8,64

Both servers run at once on loopback (the baseline with PYTHONPATH pointing at its checkout, so it runs
its own code in this venv); the levels run in interleaved rounds (baseline, current, then current,
baseline, ...), so slow drift on a shared machine falls on both alike. Prints the median ok/s and p99
per level and build and their ratio, and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
from pathlib import Path

from grinfer.bench.load import parse_clients, run_load
from grinfer.bench.served import ServedProcess


def start(name: str, src: Path | None, model: str | None, work: Path, backend: str) -> ServedProcess:
    """One server: its own store copy and home under `work`; `src` puts another checkout's code first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRINFER_")}
    env["GRINFER_HOME"] = str(work / "home")  # shared: the demo models are trained once
    env["GRINFER_LOG_LEVEL"] = "warning"
    if src is not None:
        env["PYTHONPATH"] = str(src)
    args = ["--backend", backend, "--device", "cpu", "--store", f"sqlite:///{work / f'{name}.db'}"]
    if model:
        args += ["--model", model]
    return ServedProcess(args, work / f"{name}.log", env=env)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--baseline-src", type=Path, required=True, help="a checkout of the baseline build")
    parser.add_argument("--model", help="checkpoint dir [the demo models]")
    parser.add_argument("--backend", default="eager", help="both servers' --backend [eager]")
    parser.add_argument("--endpoint", default="recommend", help="recommend or rank [recommend]")
    parser.add_argument("--clients", default="8,64", help="client counts [8,64]")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds [3]")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per level and build [10]")
    parser.add_argument("--out", type=Path, default=Path("runs/ab_serve.json"), help="JSON output")
    args = parser.parse_args(argv)
    if not (args.baseline_src / "grinfer").is_dir():
        parser.error(f"--baseline-src: {args.baseline_src} holds no grinfer package")
    levels = parse_clients([args.clients])
    work = Path(tempfile.mkdtemp(prefix="grinfer-ab-"))
    servers = {}
    try:
        servers["baseline"] = start("baseline", args.baseline_src.resolve(), args.model, work, args.backend)
        servers["baseline"].wait_ready(900)  # trains the demo models on a first start
        servers["current"] = start("current", None, args.model, work, args.backend)
        servers["current"].wait_ready(900)
        runs: dict[tuple[str, int], list] = {}
        order = ["baseline", "current"]
        for r in range(args.rounds):
            for name in order if r % 2 == 0 else order[::-1]:
                for level, result in zip(levels, run_load(servers[name].url, levels, endpoint=args.endpoint,
                                                          duration_s=args.duration, requests=100_000)):
                    runs.setdefault((name, level), []).append(result)
                    print(f"round {r + 1} {name:>8} {level:>3} clients: {result.ok_per_s:7.1f} ok/s, "
                          f"p99 {result.p99_ms or 0:7.1f} ms, errors {sum(result.errors.values())}, "
                          f"429 {result.rejected_429}", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    rows = []
    for level in levels:
        row: dict = {"clients": level}
        for name in order:
            results = runs[(name, level)]
            row[name] = {"ok_per_s": statistics.median(r.ok_per_s for r in results),
                         "p99_ms": statistics.median(r.p99_ms or 0.0 for r in results),
                         "errors": sum(sum(r.errors.values()) for r in results),
                         "rejected_429": sum(r.rejected_429 for r in results)}
        row["speedup"] = row["current"]["ok_per_s"] / max(row["baseline"]["ok_per_s"], 1e-9)
        rows.append(row)
    print(f"\n{args.endpoint}, {args.rounds} interleaved rounds of {args.duration:g} s, medians")
    print(f"{'clients':>7} {'baseline ok/s':>14} {'p99 ms':>8} {'current ok/s':>13} {'p99 ms':>8} {'ratio':>6} "
          f"{'errors b/c':>10}")
    for row in rows:
        b, c = row["baseline"], row["current"]
        print(f"{row['clients']:>7} {b['ok_per_s']:>14.1f} {b['p99_ms']:>8.1f} {c['ok_per_s']:>13.1f} "
              f"{c['p99_ms']:>8.1f} {row['speedup']:>6.2f} {b['errors']:>4}/{c['errors']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "levels": rows},
                                   indent=2))
    print(f"wrote {args.out}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
