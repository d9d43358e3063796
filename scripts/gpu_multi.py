"""Several devices in one host, measured through the real server (`scripts/gpu_multi.sh` runs the steps).

    prepare --home H [--preset mtgr-large --items 20000 --users 128 --static 1000 --realtime 90]
        a random-weight checkpoint of the preset and a SQLite store under H: each user with `static` static
        events (S) and `realtime` real-time ones (R)
    serve --home H --devices D --out FILE [--workers N --clients 32 --duration 20 --drill]
        the server as `grinfer serve --devices D` runs it (`Launch`, in this process, so a drill can reach its
        engines), then from `--load-procs` client processes: every user once (cold: fills the KV caches),
        then `clients` closed loops of R1-warm /v1/rank bodies for `duration` seconds (the user's S and R
        cached, `new_events` new events in the body, `candidates` candidates); with --drill, a second timed
        run in which engine 1 fails at a third of it (engine_set.fail_engine) and heals at two thirds
    load --home H --url URL --out FILE [...]
        the same cold pass and timed run against a server or balancer that is already running (replicas)
    report FILE...
        one table of every run: answers/s, p50, p99, errors, KV hit share, and the drill's phases

Timings live only in the JSON and the table; nothing here asserts on them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

PHASES = ("before", "during", "after")  # the drill's thirds: healthy, engine 1 failing, healed
SPAWN_S = 5.0  # client processes are spawned (a fresh interpreter each) before the load starts at once


def store_url(home: Path) -> str:
    return f"sqlite:///{home / 'multi.db'}"


def prepare(args) -> None:
    """The checkpoint and the store of the run (random weights: throughput does not depend on them)."""
    import torch

    from grinfer.config import preset
    from grinfer.data.synthetic import generate_synthetic
    from grinfer.model import build_model
    from grinfer.model.checkpoint import save_checkpoint
    from grinfer.storage import open_store
    from grinfer.storage.base import Event
    from grinfer.storage.importer import import_dataset

    home = Path(args.home)
    home.mkdir(parents=True, exist_ok=True)
    ds = generate_synthetic(num_users=args.users, num_items=args.items, mean_events=args.static * 1.2,
                            min_events=args.static, seed=0)
    cfg = preset(args.preset).with_vocab(num_items=ds.catalog.num_items, num_genres=ds.catalog.num_genres,
                                         num_year_buckets=ds.catalog.num_year_buckets)
    torch.manual_seed(0)
    save_checkpoint(build_model(cfg).eval(), home / "model")
    store = open_store(store_url(home))
    import_dataset(ds, store, progress=False)
    rng = random.Random(0)
    raw = [int(i) for i in ds.catalog.raw_ids[1:]]
    for user in ds.users:  # R events after the static history (they stay R: no roll)
        last = int(user.timestamps[-1])
        store.append_events(str(user.user_id), [Event(rng.choice(raw), last + 60 * (n + 1), rng.randint(1, 5))
                                                for n in range(args.realtime)])
    store.close()
    print(f"prepared {home}: {args.preset} over {ds.catalog.num_items} items, {args.users} users with "
          f">= {args.static} S + {args.realtime} R events")


# ---- load ------------------------------------------------------------------------------------------
def _bodies(users: list[str], items: list[int], candidates: int, new_events: int, seed: int):
    """R1-warm /v1/rank bodies: a random user, `new_events` events never sent before, distinct candidates."""
    rng = random.Random(seed)
    ts = 1_800_000_000 + seed * 100_000
    while True:
        ts += new_events
        yield {"user": rng.choice(users),
               "events": [{"item": rng.choice(items), "ts": ts + n, "action": rng.randint(1, 5)}
                          for n in range(new_events)],
               "candidates": [{"item": i} for i in rng.sample(items, candidates)]}


def _loops(url: str, bodies: list[dict] | None, users: list[str], items: list[int], candidates: int,
           new_events: int, seed: int, clients: int, duration_s: float, start_at: float) -> list[tuple]:
    """One client process: from `start_at` (time.time()), `clients` closed loops over `bodies` (each sent
    once) or, without, over fresh bodies for `duration_s`; (seconds since start_at, status, latency ms, cache
    status) per request."""
    async def go() -> list[tuple]:
        records: list[tuple] = []
        source = iter(bodies) if bodies is not None else _bodies(users, items, candidates, new_events, seed)
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits, trust_env=False) as client:
            await asyncio.sleep(max(0.0, start_at - time.time()))
            start = time.perf_counter() - (time.time() - start_at)

            async def loop() -> None:
                while bodies is not None or time.perf_counter() - start < duration_s:
                    body = next(source, None)
                    if body is None:
                        return
                    t0 = time.perf_counter()
                    try:
                        r = await client.post("/v1/rank", json=body, headers={"X-User-Id": body["user"]})
                        status, cache = str(r.status_code), r.headers.get("x-grinfer-cache", "")
                    except httpx.HTTPError as exc:
                        status, cache = type(exc).__name__, ""
                    t1 = time.perf_counter()
                    records.append((t0 - start, status, 1e3 * (t1 - t0), cache))

            await asyncio.gather(*(loop() for _ in range(clients)))
        return records

    return asyncio.run(go())


def run_load(url: str, users: list[str], items: list[int], args, cold: bool, seed: int,
             start_at: float | None = None) -> list[tuple]:
    """Every user once (cold) or the timed R1-warm run, spread over `args.load_procs` client processes that
    all start at `start_at` (time.time(); default: once they can have started)."""
    start_at = time.time() + SPAWN_S if start_at is None else start_at
    procs = max(1, min(args.load_procs, args.clients))
    shares = [args.clients // procs + (i < args.clients % procs) for i in range(procs)]
    jobs = []
    for i, clients in enumerate(shares):
        bodies = None
        if cold:
            mine = users[i::procs]
            bodies = [next(_bodies([u], items, args.candidates, args.new_events, seed + 1000 + n)) for n, u in
                      enumerate(mine)]
        jobs.append((url, bodies, users, items, args.candidates, args.new_events, seed + i, clients, args.duration,
                     start_at))
    with multiprocessing.get_context("spawn").Pool(procs) as pool:
        parts = pool.starmap(_loops, jobs)
    return sorted(r for part in parts for r in part)


def summary(records: list[tuple], seconds: float | None = None) -> dict:
    """Answers, errors by status, answers/s, p50/p99 of the answers (ms), cache status of the answers."""
    ok = sorted(r[2] for r in records if r[1] == "200")
    span = seconds if seconds is not None else (max((r[0] + r[2] / 1e3 for r in records), default=0.0)
                                                - min((r[0] for r in records), default=0.0))
    return {"requests": len(records), "ok": len(ok), "errors": dict(Counter(r[1] for r in records if r[1] != "200")),
            "ok_per_s": len(ok) / span if span else 0.0, "seconds": span,
            "p50_ms": ok[len(ok) // 2] if ok else None, "p99_ms": ok[min(len(ok) - 1, int(0.99 * len(ok)))]
            if ok else None, "cache": dict(Counter(r[3] for r in records if r[1] == "200"))}


def ring_metrics(url: str) -> dict:
    """The engine set's ring counters from /metrics (empty for one engine): {family: {engine: value}}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=30, trust_env=False).text
    wanted = ("grinfer_engine_in_ring", "grinfer_engine_ring_leaves", "grinfer_engine_ring_joins",
              "grinfer_engine_dispatched", "grinfer_engine_rehashed")
    return {f.name: {s.labels["engine"]: s.value for s in f.samples} for f in text_string_to_metric_families(text)
            if f.name in wanted}


def users_and_items(home: Path) -> tuple[list[str], list[int]]:
    from grinfer.storage import open_store

    store = open_store(store_url(home))
    try:
        catalog = store.load_catalog()
        assert catalog is not None, "run prepare first"
        return store.list_users(100_000, 0), [int(i) for i in catalog.raw_ids[1:]]
    finally:
        store.close()


def measure(url: str, home: Path, args, drill=None) -> dict:
    """The cold pass and the timed run against `url`; with `drill` (fail, heal), the drill's run after it."""
    users, items = users_and_items(home)
    out = {"settings": {k: v for k, v in vars(args).items() if k != "func"}, "users": len(users)}
    out["cold"] = summary(run_load(url, users, items, args, cold=True, seed=0))
    out["warm"] = summary(run_load(url, users, items, args, cold=False, seed=1), args.duration)
    if drill is not None:
        fail, heal = drill
        third, start_at = args.duration / 3, time.time() + SPAWN_S
        for at, action in ((third, fail), (2 * third, heal)):
            threading.Timer(start_at + at - time.time(), action).start()
        records = run_load(url, users, items, args, cold=False, seed=2, start_at=start_at)
        out["drill"] = {phase: summary([r for r in records if i * third <= r[0] < (i + 1) * third], third)
                        for i, phase in enumerate(PHASES)}
    out["ring"] = ring_metrics(url)
    return out


# ---- the server in this process --------------------------------------------------------------------
def serve(args) -> None:
    """Start the server (as `grinfer serve`), measure it from a thread, write the JSON, stop it."""
    from grinfer.config import load_server_config
    from grinfer.serving.background import free_port

    home = Path(args.home)
    cfg = load_server_config(env=os.environ, model=str(home / "model"), store=store_url(home), devices=args.devices,
                             workers=args.workers, port=free_port(), grpc_port=0, home=str(home / "grinfer"),
                             backend=args.backend, latency_target_ms=args.latency_target_ms)
    if cfg.workers:  # before prometheus_client is imported, as the CLI does
        from grinfer.serving.workers import metrics_dir_env

        os.environ.update(metrics_dir_env(cfg))
    import logging

    from grinfer.serving.engine_set import EngineSet, fail_engine
    from grinfer.serving.server import Launch

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    launch = Launch(cfg, home / "model", cfg.device_list("cpu")[0])
    url = f"http://127.0.0.1:{cfg.port}"

    def drive() -> None:
        try:
            start = time.monotonic()
            while httpx.get(f"{url}/readyz", timeout=5, trust_env=False).status_code != 200:
                if launch.prep.error is not None or time.monotonic() - start > args.ready_timeout:
                    raise RuntimeError(f"server not ready: {launch.prep.error or 'timed out'}")
                time.sleep(0.5)
            ready_s = time.monotonic() - start
            drill = None
            if args.drill:
                engine_set = launch.parts["server"].engine.production
                assert isinstance(engine_set, EngineSet), "--drill needs two or more --devices"
                heal: list = []
                drill = (lambda: heal.append(fail_engine(engine_set.engines[1])), lambda: heal.pop()())
            result = {"devices": args.devices, "workers": args.workers, "ready_s": ready_s,
                      **measure(url, home, args, drill)}
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
            print(format_report([result]))
        except Exception as exc:
            print(f"gpu_multi serve: {type(exc).__name__}: {exc}", file=sys.stderr)
            Path(args.out).with_suffix(".error").write_text(f"{type(exc).__name__}: {exc}\n")
        finally:
            launch.web.should_exit = True

    threading.Thread(target=drive, name="gpu-multi-drive", daemon=True).start()
    launch.serve()


def load(args) -> None:
    result = {"devices": args.label, "workers": None, **measure(args.url, Path(args.home), args)}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(format_report([result]))


# ---- report ----------------------------------------------------------------------------------------
def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _row(name: str, s: dict) -> str:
    hits = s["cache"].get("hit", 0) + s["cache"].get("partial", 0)
    share = f"{hits / s['ok']:.2f}" if s["ok"] else "-"
    errors = ",".join(f"{k}:{v}" for k, v in sorted(s["errors"].items())) or "0"
    return (f"{name:<34} {s['requests']:>8} {s['ok_per_s']:>9.1f} {_ms(s['p50_ms']):>8} {_ms(s['p99_ms']):>8} "
            f"{errors:>14} {share:>6}")


def format_report(results: list[dict]) -> str:
    lines = [f"{'run':<34} {'requests':>8} {'answers/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>14} {'cached':>6}"]
    for r in results:
        name = f"{r['devices']} w{r['workers']}" if r["workers"] is not None else str(r["devices"])
        lines.append(_row(f"{name} cold pass", r["cold"]))
        lines.append(_row(f"{name} warm", r["warm"]))
        for phase, s in r.get("drill", {}).items():
            lines.append(_row(f"{name} drill {phase}", s))
        if r.get("ring"):
            ring = {k.removeprefix("grinfer_engine_"): v for k, v in r["ring"].items()}
            lines.append(f"  ring: {json.dumps(ring, sort_keys=True)}")
    return "\n".join(lines)


def report(args) -> None:
    results = [json.loads(Path(f).read_text()) for f in args.files if Path(f).is_file()]
    print(format_report(results))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Several devices in one host, measured through the real server.")
    sub = parser.add_subparsers(required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--home", required=True)
    p.add_argument("--preset", default="mtgr-large")
    p.add_argument("--items", type=int, default=20_000)
    p.add_argument("--users", type=int, default=128)
    p.add_argument("--static", type=int, default=1000)
    p.add_argument("--realtime", type=int, default=90)
    p.set_defaults(func=prepare)
    for name, func in (("serve", serve), ("load", load)):
        p = sub.add_parser(name)
        p.add_argument("--home", required=True)
        p.add_argument("--out", required=True)
        p.add_argument("--clients", type=int, default=32)
        p.add_argument("--duration", type=float, default=20.0)
        p.add_argument("--load-procs", type=int, default=4)
        p.add_argument("--candidates", type=int, default=512)
        p.add_argument("--new-events", type=int, default=10)
        if name == "serve":
            p.add_argument("--devices", required=True)
            p.add_argument("--workers", type=int, default=0)
            p.add_argument("--backend", default="fused")
            p.add_argument("--drill", action="store_true")
            p.add_argument("--latency-target-ms", type=int, default=0,
                           help="the server's admission target (0: admit every request; the loops are closed)")
            p.add_argument("--ready-timeout", type=float, default=300.0)
        else:
            p.add_argument("--url", required=True)
            p.add_argument("--label", required=True, help="the run's name in the table")
        p.set_defaults(func=func)
    p = sub.add_parser("report")
    p.add_argument("files", nargs="+")
    p.set_defaults(func=report)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
