"""Where a served request's time goes, phase by phase (`python -m grinfer.bench.phases`).

Starts the real REST app on loopback (uvicorn, a SQLite store, the in-process cache, an engine on the
chosen backend) over a random mtgr-tiny model and the demo's synthetic catalogue, sends closed-loop
`/v1/rank` requests (100 candidates by default) and `/v1/recommend` requests from a few clients, then
reads the server's own `grinfer_request_phase_seconds` histogram from `/metrics`. Prints the mean per
phase, the time outside the engine, and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import random
import re
import tempfile
import time
from pathlib import Path

import httpx
import torch

from grinfer.config import EngineConfig, preset
from grinfer.data import load_dataset
from grinfer.engine import Engine
from grinfer.model.mtgr import MTGR
from grinfer.serving.app import AppState, create_app
from grinfer.serving.background import BackgroundServer
from grinfer.serving.metrics import Metrics
from grinfer.serving.service import RecommenderService
from grinfer.storage import open_cache, open_store
from grinfer.storage.importer import import_dataset
from grinfer.train.run import DEMO_DATA, config_for

PHASE = re.compile(r'grinfer_request_phase_seconds_(sum|count)\{endpoint="([^"]+)",phase="([^"]+)"\} (\S+)')


def _load_in_process(url: str, endpoint: str, bodies: list[dict], clients: int) -> float:
    """The closed-loop load from a child process (a client in the server's process would share its GIL)."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_run_load, (url, endpoint, bodies, clients))


def _run_load(url: str, endpoint: str, bodies: list[dict], clients: int) -> float:
    return asyncio.run(_load(url, endpoint, bodies, clients))


async def _load(url: str, endpoint: str, bodies: list[dict], clients: int) -> float:
    queue = list(bodies)

    async def client(http: httpx.AsyncClient) -> None:
        while queue:
            r = await http.post(f"{url}/v1/{endpoint}", json=queue.pop())
            r.raise_for_status()

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=60) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return time.perf_counter() - start


def measure(requests: int, clients: int, candidates: int, backend: str, device: str) -> dict:
    """Run the load on both endpoints; returns per-endpoint phase means (ms), req/s and time outside the engine."""
    ds = load_dataset(DEMO_DATA)
    torch.manual_seed(0)
    model = MTGR(config_for(preset("mtgr-tiny"), ds)).eval()
    rng = random.Random(0)
    users = [u.user_id for u in ds.users]
    items = [int(i) for i in ds.catalog.raw_ids[1:]]
    with tempfile.TemporaryDirectory() as tmp:
        store, cache = open_store(f"sqlite:///{Path(tmp) / 'bench.db'}"), open_cache("memory://")
        import_dataset(ds, store, progress=False)
        engine = Engine(model, ds.catalog, EngineConfig.model_validate({"backend": backend, "device": device})).start()
        metrics = Metrics(engine, backend)
        engine.on_step = metrics.on_step
        service = RecommenderService(engine, ds.catalog, store, cache)
        results = {}
        try:
            with BackgroundServer(create_app(AppState(service, metrics))) as url:
                bodies = {"rank": [{"user": str(rng.choice(users)),
                                    "candidates": [{"item": i} for i in rng.sample(items, candidates)]}
                                   for _ in range(requests)],
                          "recommend": [{"user": str(rng.choice(users)), "k": 10} for _ in range(requests)]}
                for endpoint, batch in bodies.items():
                    _load_in_process(url, endpoint, batch[: max(clients * 4, 20)], clients)  # warm-up
                    before = phase_means_raw(httpx.get(f"{url}/metrics").text)
                    seconds = _load_in_process(url, endpoint, batch, clients)
                    after = phase_means_raw(httpx.get(f"{url}/metrics").text)
                    means = _delta_means(before, after, f"/v1/{endpoint}")
                    total = sum(means.values())
                    results[endpoint] = {"phases_ms": {k: 1e3 * v for k, v in means.items()},
                                         "total_ms": 1e3 * total,
                                         "outside_engine_ms": 1e3 * (total - means.get("engine", 0.0)
                                                                     - means.get("retrieve", 0.0)),
                                         "requests_per_s": requests / seconds}
        finally:
            engine.shutdown()
            store.close()
    return {"requests": requests, "clients": clients, "candidates": candidates, "backend": backend,
            "device": device, "endpoints": results}


def phase_means_raw(text: str) -> dict[tuple[str, str], tuple[float, float]]:
    """{(endpoint, phase): (sum, count)} from a /metrics page."""
    out: dict[tuple[str, str], list[float]] = {}
    for kind, endpoint, phase, value in PHASE.findall(text):
        out.setdefault((endpoint, phase), [0.0, 0.0])[kind == "count"] = float(value)
    return {k: (v[0], v[1]) for k, v in out.items()}


def _delta_means(before: dict, after: dict, endpoint: str) -> dict[str, float]:
    means = {}
    for (ep, phase), (total, count) in after.items():
        if ep != endpoint:
            continue
        t0, c0 = before.get((ep, phase), (0.0, 0.0))
        if count > c0:
            means[phase] = (total - t0) / (count - c0)
    return means


def print_table(result: dict) -> None:
    for endpoint, r in result["endpoints"].items():
        print(f"\n/v1/{endpoint}  ({result['requests']} requests, {result['clients']} clients, "
              f"{result['backend']} on {result['device']}): {r['requests_per_s']:.0f} req/s")
        print(f"  {'phase':<10} {'mean ms':>9}")
        for phase, ms in r["phases_ms"].items():
            print(f"  {phase:<10} {ms:>9.3f}")
        print(f"  {'total':<10} {r['total_ms']:>9.3f}\n  {'outside engine':<14} {r['outside_engine_ms']:>5.3f} ms")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=500, help="requests per endpoint [500]")
    parser.add_argument("--clients", type=int, default=1, help="closed-loop clients [1]")
    parser.add_argument("--candidates", type=int, default=100, help="candidates per /v1/rank [100]")
    parser.add_argument("--backend", default="eager", help="engine backend [eager]")
    parser.add_argument("--device", default="cpu", help="engine device [cpu]")
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args(argv)
    print(f"phases: {args.requests} requests per endpoint at {args.clients} client(s); about "
          f"{max(5, args.requests // 60)} s on 2 CPU cores")
    result = measure(args.requests, args.clients, args.candidates, args.backend, args.device)
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
