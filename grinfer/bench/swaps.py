"""Zero-downtime model swaps under closed-loop load: `python -m grinfer.bench.swaps`.

Closed-loop clients rank against a server in registry mode while versions are promoted one after another
through POST /v1/admin/models/promote (each call returns once the new version is loaded beside the old one,
warmed, switched to and the old one drained). Every answer is timed; the table compares the steady state
(answers that completed outside every swap) with each swap's window (from the promote call to its return):
requests, non-2xx answers, p50 / p99 / max latency, and the server's own load + warm-up and drain seconds.

Without --server it builds everything itself on loopback: N mtgr-tiny checkpoints with different seeded
weights for a small synthetic dataset, registered in a fresh SQLite store, and a `grinfer serve
--model-name` child process on the CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from grinfer.bench.load import loopback_url, percentile, prepare
from grinfer.bench.protocols import rest_sender

DATA = "synthetic:users=40,items=80,events=20,seed=0"


@dataclass
class Window:
    """Answers that completed in one phase: steady state, or one swap's window."""

    name: str
    requests: int = 0
    non_2xx: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    swap_s: float | None = None  # the promote call, client side
    load_s: float | None = None  # the server's load + warm-up of the new version
    drain_s: float | None = None  # the server's drain of the old one

    def row(self) -> dict:
        ordered = sorted(self.latencies_ms)
        return {"phase": self.name, "requests": self.requests, "non_2xx": sum(self.non_2xx.values()),
                "p50_ms": percentile(ordered, 50), "p99_ms": percentile(ordered, 99),
                "max_ms": ordered[-1] if ordered else None, "swap_s": self.swap_s, "load_s": self.load_s,
                "drain_s": self.drain_s, "errors": self.non_2xx}


async def run_swaps(server: str, model: str, versions: list[int], clients: int = 4, settle_s: float = 2.0,
                    api_key: str | None = None, candidates: int = 20, timeout_s: float = 60.0) -> list[Window]:
    """Promote `versions` of `model` one after another under `clients` closed loops; the steady window first,
    then one per swap."""
    base = loopback_url(server)
    headers = {"X-API-Key": api_key} if api_key else {}
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    async with httpx.AsyncClient(base_url=base, timeout=timeout_s, limits=limits, trust_env=False,
                                 headers=headers) as client:
        workload = await prepare(client, "rank", candidates, 10, seed=0)
        send = rest_sender(client, "rank")
        answers: list[tuple[float, float, str]] = []  # (sent, answered, outcome), perf_counter seconds
        stop = asyncio.Event()

        async def loop() -> None:
            while not stop.is_set():
                sent = time.perf_counter()
                outcome, _ = await send(workload.body())
                answers.append((sent, time.perf_counter(), outcome))

        loops = [asyncio.create_task(loop()) for _ in range(clients)]
        swaps: list[tuple[float, float, Window]] = []
        try:
            await asyncio.sleep(settle_s)
            for version in versions:
                window = Window(f"swap to {model}:{version}")
                start = time.perf_counter()
                r = await client.post("/v1/admin/models/promote", json={"name": model, "version": version})
                end = time.perf_counter()
                r.raise_for_status()
                swap = r.json()["swap"] or {}
                window.swap_s, window.load_s, window.drain_s = end - start, swap.get("load_s"), swap.get("drain_s")
                swaps.append((start, end, window))
                await asyncio.sleep(settle_s)
        finally:
            stop.set()
            await asyncio.gather(*loops)
    steady = Window("steady")
    for sent, answered, outcome in answers:
        # an answer belongs to a swap when its request was in flight at any moment of the swap's window
        target = next((w for start, end, w in swaps if sent <= end and answered >= start), steady)
        target.requests += 1
        if outcome == "200":
            target.latencies_ms.append(1e3 * (answered - sent))
        else:
            target.non_2xx[outcome] = target.non_2xx.get(outcome, 0) + 1
    return [steady, *(w for _, _, w in swaps)]


def _cell(value: float | None, scale: float = 1.0) -> str:
    return "-" if value is None else f"{value * scale:.1f}"


def format_windows(windows: list[Window]) -> str:
    """The table: one row per phase."""
    lines = [f"{'phase':<22} {'requests':>8} {'non-2xx':>7} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} "
             f"{'swap s':>6} {'load+warm s':>11} {'drain ms':>8}"]
    for w in windows:
        r = w.row()
        lines.append(f"{w.name:<22} {r['requests']:>8} {r['non_2xx']:>7} {_cell(r['p50_ms']):>7} "
                     f"{_cell(r['p99_ms']):>7} {_cell(r['max_ms']):>7} {_cell(w.swap_s):>6} {_cell(w.load_s):>11} "
                     f"{_cell(w.drain_s, 1e3):>8}")
    return "\n".join(lines)


def make_versions(root: Path, count: int, data: str = DATA, preset_name: str = "mtgr-tiny") -> list[Path]:
    """`count` checkpoints of `preset_name` for `data`, with weights seeded 1..count (no training)."""
    import torch

    from grinfer.config import preset
    from grinfer.data import load_dataset
    from grinfer.model import build_model
    from grinfer.model.checkpoint import save_checkpoint
    from grinfer.train.run import config_for

    cfg = config_for(preset(preset_name), load_dataset(data))
    paths = []
    for seed in range(1, count + 1):
        torch.manual_seed(seed)
        paths.append(save_checkpoint(build_model(cfg).eval(), root / f"v{seed}", extra={"training": {"data": data}}))
    return paths


# admission off (it sheds load at the door while a fresh server has no rate estimate): only a swap may refuse
SETTINGS = {"GRINFER_LATENCY_TARGET_MS": "0", "GRINFER_REGISTRY_POLL_S": "0"}


def serve_registered(paths: list[Path], store_url: str, home: Path, model: str = "ranker",
                     settings: dict[str, str] = SETTINGS):
    """Register `paths` as versions 1..n of `model`, promote 1, start `grinfer serve --model-name` on it (CPU,
    eager; `settings`: more GRINFER_* environment) and return the ServedProcess once ready."""
    import os

    from grinfer.bench.served import ServedProcess
    from grinfer.registry import open_registry

    registry = open_registry(store_url)
    try:
        for path in paths:
            registry.register(path, model)
        registry.promote(model, 1)
    finally:
        registry.close()
    env = {**os.environ, "GRINFER_HOME": str(home), **settings}
    served = ServedProcess(["--model-name", model, "--store", store_url, "--device", "cpu", "--backend", "eager"],
                           home / "server.log", env=env)
    try:
        served.wait_ready(300)
    except BaseException:
        served.stop()
        raise
    return served


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Zero-downtime model swaps under closed-loop load.")
    parser.add_argument("--server", help="a running registry-mode server (loopback); default: start one here")
    parser.add_argument("--model", default="ranker")
    parser.add_argument("--versions", default="2,3,4", help="versions to promote in turn")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--settle", type=float, default=3.0, help="seconds of steady load before and after swaps")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args(argv)
    versions = [int(v) for v in args.versions.split(",")]
    with tempfile.TemporaryDirectory(prefix="grinfer-swaps-") as tmp:
        served = None
        url = args.server
        if url is None:
            root = Path(tmp)
            paths = make_versions(root / "models", max(versions))
            served = serve_registered(paths, f"sqlite://{root}/store.db", root, args.model)
            url = served.url
        try:
            windows = asyncio.run(run_swaps(url, args.model, versions, args.clients, args.settle))
        finally:
            if served is not None:
                served.stop()
    print(format_windows(windows))
    if args.json:
        args.json.write_text(json.dumps([{k: v for k, v in asdict(w).items() if k != "latencies_ms"} | w.row()
                                         for w in windows], indent=2) + "\n")


if __name__ == "__main__":
    main()
