"""A checkpoint with served (quantised, memory-mapped) tables, measured: start-up, peak RSS, ranking latency
with a cold and a warm row cache, and the embedding service's rows/s on its own.

"Cold" drops the checkpoint file's pages from the OS page cache first (posix_fadvise DONTNEED: only this
file) and starts from an empty device row cache, so rows come from disk; "warm" repeats the same item
ids for new users (their K/V is not cached either: only the rows are warm).
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

import numpy as np
import torch

from grinfer.bench.workloads import BENCH_ITEMS, Workload, bench_catalog, make_requests
from grinfer.config import EngineConfig, ModelConfig
from grinfer.embedding.hashing import collision_rate, expected_collision_rate
from grinfer.embedding.service import embedding_stats
from grinfer.embedding.table import ServedTable
from grinfer.engine.core import EngineCore
from grinfer.model.checkpoint import WEIGHTS_FILE, load_checkpoint, read_checkpoint_meta
from grinfer.model.mtgr import MTGR
from grinfer.model.tables import table_shapes

PROFILE_VALUES = 16  # make_requests draws profile values below this
COLLISION_IDS = 1_000_000  # random raw ids whose collision rate in the item table is measured


def drop_page_cache(path: Path) -> None:
    """Ask the OS to forget this file's cached pages (the next reads come from disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def process_seconds() -> float:
    """Seconds since this process started (imports included)."""
    start_ticks = int(Path("/proc/self/stat").read_text().rpartition(")")[2].split()[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def service_rows_per_s(table: ServedTable, ids_per_call: int, calls: int, seed: int = 0) -> dict[str, float]:
    """Rows/s of the table alone on random raw 64-bit ids: from disk (cold page cache, empty row cache), from
    host memory (no row cache) and from the row cache (the same ids again)."""
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, 2**62, (ids_per_call,), generator=gen) for _ in range(calls)]
    rows = ids_per_call * calls

    def timed(t: ServedTable) -> float:
        start = time.perf_counter()
        for ids in batches:
            t(ids)
        return rows / (time.perf_counter() - start)

    cached = ServedTable(table.store, table.ids, cache_bytes=max(table.cache_bytes, 2 * rows * 80))
    uncached = ServedTable(table.store, table.ids, cache_bytes=0)
    return {"disk": timed(cached), "host": timed(uncached), "cache": timed(cached)}


def run(model_dir: Path, batch: int = 8, static: int = 200, realtime: int = 20, candidates: int = 128,
        iters: int = 2, ids_per_call: int = 16384, calls: int = 8, seed: int = 0) -> dict:
    """Load the checkpoint, build the engine, time cold and warm batches, then the service alone."""
    cfg = ModelConfig.model_validate(read_checkpoint_meta(model_dir)["model"])
    if cfg.kind != "mtgr" or cfg.num_items < BENCH_ITEMS or min(cfg.profile_cardinalities) < PROFILE_VALUES:
        raise ValueError(f"--model: the benchmark's synthetic requests need an mtgr model with num_items >= "
                         f"{BENCH_ITEMS} and every profile cardinality >= {PROFILE_VALUES}, got {cfg.kind} with "
                         f"{cfg.num_items} items, cardinalities {list(cfg.profile_cardinalities)}")
    start = time.perf_counter()
    drop_page_cache(model_dir / WEIGHTS_FILE)
    model = load_checkpoint(model_dir)
    assert isinstance(model, MTGR)  # checked above
    loaded_s = time.perf_counter() - start
    w = Workload(model.cfg.name, model.cfg.name, len(model.cfg.profile_cardinalities), static, realtime, candidates,
                 batch, dtype="float32")
    tokens = w.profile_tokens + static + realtime + candidates
    core = EngineCore(model, bench_catalog(model.cfg.num_items, seed),
                      EngineConfig(kv_cache_bytes=1 << 30, max_batch_tokens=batch * tokens, max_batch_requests=batch))
    ready_s, since_exec_s = time.perf_counter() - start, process_seconds()
    rng = np.random.default_rng(seed)
    base = make_requests(w, [f"u{i}" for i in range(batch)], rng)
    rows: dict[str, list[float]] = {"cold": [], "warm": []}
    for i in range(1 + iters):
        reqs = [type(r)(f"b{i}-{r.user}", r.history_version, r.context, r.candidates, r.request_ts) for r in base]
        t0 = time.perf_counter()
        for r in reqs:
            core.add(r)
        core.run_until_done()
        rows["cold" if i == 0 else "warm"].append(time.perf_counter() - t0)
    stats = embedding_stats(core.model)
    core.close()
    item_rows = table_shapes(model.cfg)["item_emb"].rows
    collisions = {f"{n:,} ids": {"measured": collision_rate(ids, item_rows),
                                 "expected": expected_collision_rate(n, item_rows)}
                  for n, ids in ((model.cfg.num_items, torch.arange(1, model.cfg.num_items + 1)),
                                 (COLLISION_IDS, torch.randint(0, 2**62, (COLLISION_IDS,),
                                                               generator=torch.Generator().manual_seed(seed))))}
    drop_page_cache(model_dir / WEIGHTS_FILE)  # the service's "disk" row reads from disk again
    return {"model": str(model_dir), "preset": model.cfg.name, "batch": batch,
            "shape": {"profile": w.profile_tokens, "static": static, "realtime": realtime, "candidates": candidates},
            "load_s": loaded_s, "ready_s": ready_s, "ready_since_exec_s": since_exec_s,
            "cold_batch_ms": 1e3 * rows["cold"][0], "warm_batch_ms": 1e3 * float(np.median(rows["warm"])),
            "item_table": stats["item_emb"], "service_rows_per_s": service_rows_per_s(
                model.item_emb, ids_per_call, calls, seed) if isinstance(model.item_emb, ServedTable) else {},
            "hash_collisions": collisions if model.cfg.item_table_rows else {},
            "peak_rss_gb": peak_rss_gb(), "threads": torch.get_num_threads()}


def format_report(r: dict) -> str:
    """The result as a plain table."""
    item, svc = r["item_table"], r["service_rows_per_s"]
    lines = [f"{r['preset']} from {r['model']} (item table: {item['rows']:,} rows, {item['format']}, "
             f"{item['table_bytes'] / 1e9:.2f} GB memory-mapped; row cache {item['bytes'] / 1e6:.0f} MB)",
             f"shape B={r['batch']}: {r['shape']}",
             "| measure | value |", "|---|---|",
             f"| load checkpoint | {r['load_s']:.2f} s |",
             f"| ready (load + engine) | {r['ready_s']:.2f} s ({r['ready_since_exec_s']:.1f} s since exec) |",
             f"| rank B={r['batch']}, cold rows (disk) | {r['cold_batch_ms']:.0f} ms |",
             f"| rank B={r['batch']}, warm row cache | {r['warm_batch_ms']:.0f} ms |",
             f"| row-cache hit ratio (distinct rows) | {item['hit_ratio']:.3f} |",
             f"| item lookups in the engine | {item['lookups']:,} ids, {item['seconds'] * 1e3:.0f} ms |"]
    lines += [f"| service alone, {k} | {v / 1e6:.2f} M rows/s |" for k, v in svc.items()]
    lines += [f"| hash collision rate, {k} | {v['measured']:.2e} (expected {v['expected']:.2e}) |"
              for k, v in r["hash_collisions"].items()]
    lines.append(f"| peak RSS | {r['peak_rss_gb']:.2f} GB |")
    return "\n".join(lines)
