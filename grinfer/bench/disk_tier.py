"""The KV cache's disk tier across a restart (`python -m grinfer.bench.disk_tier`).

An engine with a disk tier warms N users (CPU-demo shapes: mtgr-tiny, 4 U + 60 S + 20 R tokens) and
shuts down, moving their K/V to disk; a new engine on the same directory (a restart) then gets each
user's next request (2 new R events). Prints the shutdown time, the time to index the directory at
start, the hit ratio after the restart, the restore time per user (the request's lookup on the engine
thread: reading the memory-mapped file into the device pool) and the warm request's latency against a
cold one's, and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from grinfer.bench.workloads import bench_catalog, make_requests, workload
from grinfer.config import EngineConfig
from grinfer.engine import EngineCore
from grinfer.model import build_model
from grinfer.model.mtgr import MTGR


def run_batches(core: EngineCore, requests, batch: int) -> list:
    results = []
    for i in range(0, len(requests), batch):
        for r in requests[i:i + batch]:
            core.add(r)
        results += [res for _, res in core.run_until_done()]
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--users", type=int, default=1000, help="warm users [1000]")
    parser.add_argument("--batch", type=int, default=8, help="requests per engine batch [8]")
    parser.add_argument("--out", type=Path, default=Path("runs/disk_tier.json"), help="JSON output")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    w = workload("CPU-demo")
    model, catalog = build_model(w.model_config()), bench_catalog()
    assert isinstance(model, MTGR)
    rng = np.random.default_rng(0)
    users = [f"user{i}" for i in range(args.users)]
    first = make_requests(w, users, rng)
    tokens = w.profile_tokens + w.static + w.realtime
    per_token = 2 * model.cfg.num_layers * model.cfg.num_heads * model.cfg.head_dim * 4
    with tempfile.TemporaryDirectory(prefix="grinfer-kv-") as directory:
        config = EngineConfig(kv_cache_bytes=(args.users + 64) * (tokens + 32) * per_token,
                              disk_cache_bytes=4 * args.users * tokens * per_token, disk_cache_dir=directory,
                              max_batch_requests=args.batch, max_batch_tokens=args.batch * (tokens + w.candidates))
        core = EngineCore(model, catalog, config)
        for i in tqdm(range(0, args.users, args.batch), desc="warming users", leave=False):
            run_batches(core, first[i:i + args.batch], args.batch)
        start = time.perf_counter()
        core.close()  # the K/V go down to disk
        shutdown_s = time.perf_counter() - start
        disk_bytes = sum(p.stat().st_size for p in Path(directory).rglob("*.kv"))
        start = time.perf_counter()
        core = EngineCore(model, catalog, config)  # the restart: the tier indexes what is on disk
        start_s = time.perf_counter() - start
        base = {r.user: r.context for r in first}
        again = make_requests(w, users, rng, base_events=base)
        restore = []
        acquire = core.cache._restore

        def timed(sig):
            t0 = time.perf_counter()
            out = acquire(sig)
            restore.append(time.perf_counter() - t0)
            return out

        core.cache._restore = timed
        t0 = time.perf_counter()
        results = []
        for i in tqdm(range(0, args.users, args.batch), desc="returning users", leave=False):
            results += run_batches(core, again[i:i + args.batch], args.batch)
        warm_s = time.perf_counter() - t0
        cold = make_requests(w, [f"cold{i}" for i in range(min(args.users, 200))], rng)
        t0 = time.perf_counter()
        run_batches(core, cold, args.batch)
        cold_s = (time.perf_counter() - t0) / len(cold)
        stats = core.stats()["kv_cache"]
        core.close()
    hits = sum(r.cache in ("hit", "partial") for r in results)
    report = {"users": args.users, "kv_bytes_on_disk": disk_bytes, "shutdown_s": shutdown_s, "start_index_s": start_s,
              "hit_ratio_after_restart": hits / len(results), "disk_hits": stats["disk_hits"],
              "restore_ms_per_user_p50": 1e3 * float(np.median(restore)),
              "restore_ms_per_user_p99": 1e3 * float(np.percentile(restore, 99)),
              "warm_request_ms": 1e3 * warm_s / len(results), "cold_request_ms": 1e3 * cold_s}
    print(f"{args.users} users, {disk_bytes / 2**20:.1f} MiB of K/V on disk")
    print(f"shutdown (device -> disk) {shutdown_s:.2f} s; restart indexes the directory in {start_s:.2f} s")
    print(f"after the restart: hit ratio {report['hit_ratio_after_restart']:.3f} ({stats['disk_hits']} restored "
          f"from disk); restore per user p50 {report['restore_ms_per_user_p50']:.2f} ms, "
          f"p99 {report['restore_ms_per_user_p99']:.2f} ms")
    print(f"per request (batches of {args.batch}): returning user {report['warm_request_ms']:.2f} ms, "
          f"cold user {report['cold_request_ms']:.2f} ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
