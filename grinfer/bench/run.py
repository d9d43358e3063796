"""`grinfer bench`: workloads x backends, timed through EngineCore, checked against uncached scoring."""

from __future__ import annotations

import gc
import importlib.util
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from grinfer.bench.figure import panels
from grinfer.bench.workloads import Workload, bench_catalog, make_requests, request_flops
from grinfer.config import EngineConfig, grinfer_home
from grinfer.engine.core import DTYPES, EngineCore
from grinfer.engine.probe import available_backends, choose, probe_backends
from grinfer.features.featurizer import FeatureRequest, Featurizer
from grinfer.model import build_model
from grinfer.model.mtgr import MTGR


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_ceiling(device: torch.device, dtype: torch.dtype) -> float:
    """Measured dense matmul TFLOP/s (8192³ bf16 on GPU; 1024³ on CPU)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 10 if device.type == "cuda" else 3
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@torch.inference_mode()
def uncached_probs(model: MTGR, featurizer: Featurizer, req, device) -> torch.Tensor:
    """Full recomputation of one request without any cache (the reference)."""
    batch = featurizer.rank_batch([FeatureRequest(req.context, req.candidates, req.request_ts)]).to(device)
    return torch.sigmoid(model(batch).float()).cpu()


def max_diff(model: MTGR, featurizer: Featurizer, req, res, device) -> float:
    """Largest |engine - uncached `model`| over one request's probabilities."""
    return float((uncached_probs(model, featurizer, req, device) - res.probabilities).abs().max())


def row_label(label: str, config: EngineConfig, stream: bool) -> str:
    """The backend column: the backend, then what differs from its defaults (/nograph, /int8, /kv-fp8, /stream)."""
    return (label + ("/nograph" if config.backend == "fused" and not config.cuda_graphs else "")
            + ("" if config.dense == "none" else f"/{config.dense}")
            + ("" if config.kv_dtype == "model" else f"/kv-{config.kv_dtype}") + ("/stream" if stream else ""))


def engine_config(w: Workload, backend: str, dev: torch.device, model, catalog, overrides: dict):
    """The engine's settings for one row and the row's backend label; `auto` probes as the server does and
    is labelled auto:CHOSEN, `onnx` (and auto) get the model's graph exported first, `aoti` (and auto, on the
    CPU) the cached step's package (kept under GRINFER_HOME/exports/aoti across runs)."""
    tokens_per_request = w.profile_tokens + w.static + w.realtime + w.candidates
    settings = {"backend": "eager" if backend == "auto" else backend, "device": str(dev),
                "dtype": w.dtype if dev.type == "cuda" else "float32",
                "max_batch_tokens": w.batch * tokens_per_request, "max_batch_requests": w.batch,
                "kv_cache_bytes": 0 if dev.type == "cuda" else 1 << 30, **overrides}
    if backend in ("onnx", "auto") and importlib.util.find_spec("onnxruntime") is not None:
        settings["onnx_path"] = export_onnx(model)
    if backend == "aoti" or (backend == "auto" and "aoti" in available_backends(dev)):
        from grinfer.export.cache import step_package

        block_size = overrides.get("block_size", EngineConfig.model_fields["block_size"].default)
        settings["aoti_path"] = str(step_package(model, block_size, grinfer_home() / "exports" / "aoti"))
    config = EngineConfig(**settings)
    if backend != "auto":
        return config, backend
    chosen = choose(probe_backends(model, catalog, config, available_backends(dev)))
    return config.model_copy(update={"backend": chosen.backend}), f"auto:{chosen.backend}"


def run_workload(w: Workload, backend: str, device: str, iters: int, warmup: int, seed: int,
                 engine_overrides: dict, check: int = 2, stream: bool = False) -> dict:
    """Time `iters` batches of `w.batch` concurrent requests through one engine; returns one result row.

    One batch at a time, each run to completion, by default; with `stream`, every timed batch is queued at
    once (each on users of its own), so pipelined steps overlap: the sustained rate, latencies with queueing."""
    dev = torch.device(device)
    cfg = w.model_config()
    torch.manual_seed(seed)
    model = build_model(cfg)
    catalog = bench_catalog()
    config, label = engine_config(w, backend, dev, model, catalog, engine_overrides)
    if dev.type == "cuda":
        gc.collect()  # the previous run's engine (its KV pool, CUDA graphs) must be gone before this one sizes its pool
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    # the weights before the engine quantises its projections (err fp32 compares with these)
    full_state = {k: t.clone() for k, t in model.state_dict().items()} if config.dense != "none" else None
    core = EngineCore(model, catalog, config)
    featurizer = Featurizer(catalog, cfg.num_time_buckets)
    rng = np.random.default_rng(seed)
    user_sets = [[f"user{k}-{j}" for j in range(w.batch)] for k in range(iters if stream else 1)]
    base = None
    if w.warm:  # cache U + S + the older R events of each user with a context-only request
        warm_reqs = [r for users in user_sets
                     for r in make_requests(w, users, rng, realtime=w.realtime - w.new_events, num_candidates=0)]
        base = {r.user: r.context for r in warm_reqs}
        for r in warm_reqs:
            core.add(r)
        core.run_until_done()

    def batch_requests(i: int, users: list[str]) -> list:
        if w.warm:
            return make_requests(w, users, rng, base_events=base)
        return make_requests(w, [f"cold{i}-{u}" for u in users], rng)  # fresh users every batch: nothing cached

    def timed(reqs: list) -> tuple[float, list]:
        sync(dev)
        start = time.perf_counter()
        for r in reqs:
            core.add(r)
        done = core.run_until_done()
        sync(dev)
        return time.perf_counter() - start, sorted((res for _, res in done), key=lambda r: r.request_id)

    latencies, batch_seconds, last_batch = [], [], []
    steps_before, phases_before, timed_steps = core.steps, core.phase_seconds(), core.steps
    for i in tqdm(range(warmup + (1 if stream else iters)), desc=f"{w.name} {backend}", leave=False):
        if i == warmup:
            while core.runner.backend.capture_pending():  # the warm-up's CUDA-graph buckets, as the server's
                pass                                       # idle-time captures would do before traffic
            phases_before, timed_steps = core.phase_seconds(), core.steps
        reqs = ([r for k, users in enumerate(user_sets) for r in batch_requests(i + k, users)]
                if stream and i >= warmup else batch_requests(i, user_sets[0]))
        elapsed, results = timed(reqs)
        if i >= warmup:
            batch_seconds.extend([elapsed / (len(reqs) // w.batch)] * (len(reqs) // w.batch))
            latencies.extend(res.total_seconds for res in results)
        last_batch = list(zip(reqs, results))[-w.batch:]

    timed_steps = max(core.steps - timed_steps, 1)
    phase_ms = {k: 1e3 * (v - phases_before[k]) / timed_steps for k, v in core.phase_seconds().items()}
    core.close()
    reference = build_model(cfg).to(dev).eval()
    # fp32 twin of the engine's (maybe bf16) weights, before any quantisation
    reference.load_state_dict(model.state_dict() if full_state is None else full_state)
    reference.float()
    diffs, fp32_errs = zip(*((max_diff(core.model, featurizer, req, res, dev),
                              max_diff(reference, featurizer, req, res, dev)) for req, res in last_batch[:check]))

    flops = request_flops(cfg, w.profile_tokens, w.static, w.realtime, w.candidates,
                          computed_realtime=w.new_events, context_cached=w.warm)
    per_batch = float(np.median(batch_seconds))
    steps_per_batch = (core.steps - steps_before) / (warmup + iters)  # a stream's iters batches count once each
    stats = core.stats()["kv_cache"]
    per_token = core.pool.bytes_per_token(cfg.num_layers, cfg.num_heads, cfg.head_dim, DTYPES[config.dtype],
                                          config.kv_dtype)
    context_tokens = w.profile_tokens + w.static + w.realtime
    return {
        "workload": w.name, "backend": row_label(label, config, stream), "stream": stream,
        "dense": config.dense, "kv_dtype": config.kv_dtype,
        "pipeline_depth": config.pipeline_depth, "step_ms": 1e3 * per_batch / max(steps_per_batch, 1e-9),
        "phase_ms_per_step": phase_ms,
        "cuda_graphs": config.cuda_graphs, "device": device, "dtype": config.dtype, "batch": w.batch,
        "shape": {"profile": w.profile_tokens, "static": w.static, "realtime": w.realtime,
                  "candidates": w.candidates, "new_events": w.new_events, "preset": w.preset},
        "p50_ms": 1e3 * float(np.percentile(latencies, 50)), "p99_ms": 1e3 * float(np.percentile(latencies, 99)),
        "batch_ms": 1e3 * per_batch, "ms_per_request": 1e3 * per_batch / w.batch,
        "requests_per_s": w.batch / per_batch, "candidates_per_s": w.batch * w.candidates / per_batch,
        "gflop_per_request": flops / 1e9, "achieved_tflops": flops * w.batch / per_batch / 1e12,
        "peak_memory_gb": peak_memory_bytes(dev) / 1e9, "kv_hit_ratio": stats["hit_ratio"],
        "kv_cache": stats, "cache_capacity_users": core.cache.num_blocks * core.cache.block_size // context_tokens,
        "kv_bytes_per_context": per_token * context_tokens,
        "host_capacity_users": config.host_cache_bytes // (per_token * context_tokens),
        "max_abs_diff_vs_uncached": max(diffs), "max_abs_err_vs_fp32": max(fp32_errs),
        "steps_per_batch": steps_per_batch,
    }


def export_onnx(model) -> str:
    """The model's ranking graph exported to ONNX (checked against eager) in a temporary directory."""
    from grinfer.export.export import export_checkpoint
    from grinfer.model.checkpoint import save_checkpoint

    root = Path(tempfile.mkdtemp(prefix="grinfer-bench-onnx-"))
    save_checkpoint(model, root / "model")
    (exported,) = export_checkpoint(root / "model", root / "ranking.onnx", "onnx", progress=False)
    return str(exported.path)


def row_line(r: dict) -> str:
    """One finished row on one line (progress output while a long benchmark runs)."""
    return (f"done: {r['workload']} {r['backend']} depth {r['pipeline_depth']} B={r['batch']}: step "
            f"{r['step_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, {r['ms_per_request']:.3f} ms/req, "
            f"{r['requests_per_s']:.1f} req/s, {r['achieved_tflops']:.3g} TFLOP/s, {r['peak_memory_gb']:.2f} GB, "
            f"hit {r['kv_hit_ratio']:.2f}, diff {r['max_abs_diff_vs_uncached']:.2e}")


def format_table(rows: list[dict], ceiling: float) -> str:
    """A fixed-width table of the headline numbers."""
    cols = [("workload", "{:<9}"), ("backend", "{:<22}"), ("pipeline_depth", "{:>5}"), ("batch", "{:>5}"),
            ("step_ms", "{:>8.2f}"), ("p50_ms", "{:>9.2f}"),
            ("p99_ms", "{:>9.2f}"), ("ms_per_request", "{:>9.3f}"), ("requests_per_s", "{:>9.1f}"),
            ("candidates_per_s", "{:>11.0f}"), ("achieved_tflops", "{:>8.3g}"), ("peak_memory_gb", "{:>7.2f}"),
            ("kv_hit_ratio", "{:>6.2f}"), ("max_abs_diff_vs_uncached", "{:>9.2e}"), ("max_abs_err_vs_fp32", "{:>9.2e}")]
    heads = ["workload", "backend", "depth", "B", "step ms", "p50 ms", "p99 ms", "ms/req", "req/s", "cand/s",
             "TFLOP/s", "mem GB", "hit", "diff", "err fp32"]
    widths = [len(f.format(rows[0][c])) if rows else 8 for c, f in cols]
    lines = ["  ".join(h.rjust(w) for h, w in zip(heads, widths))]
    for r in rows:
        lines.append("  ".join(f.format(r[c]) for c, f in cols))
    lines.append(f"matmul ceiling (measured): {ceiling:.3g} TFLOP/s; achieved = counted FLOPs / median batch time")
    lines.append("")
    lines.append(phase_table(rows))
    return "\n".join(lines)


def phase_table(rows: list[dict]) -> str:
    """Host milliseconds per engine step by phase (launch = queueing the device work, and the work itself
    where the calling thread is the device; wait = blocked on the device)."""
    phases = list(rows[0]["phase_ms_per_step"]) if rows else []
    lines = ["host ms per step: " + "  ".join(f"{p:>9}" for p in ["workload", "backend", "depth", "B", *phases])]
    for r in rows:
        cells = [r["workload"], r["backend"], str(r["pipeline_depth"]), str(r["batch"]),
                 *(f"{r['phase_ms_per_step'][p]:.3f}" for p in phases)]
        lines.append("                  " + "  ".join(f"{c:>9}" for c in cells))
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Requests/s and p99 latency per workload and backend."""
    labels = [f"{r['workload']}\n{r['backend']} B={r['batch']}" for r in rows]
    with panels(path, 2, (max(8, 1.6 * len(rows) * 2), 4)) as axes:
        axes[0].bar(labels, [r["requests_per_s"] for r in rows], color="tab:blue")
        axes[0].set_ylabel("requests / s")
        axes[1].bar(labels, [r["p99_ms"] for r in rows], color="tab:orange")
        axes[1].set_ylabel("p99 latency (ms)")
        for ax in axes:
            ax.tick_params(axis="x", labelsize=7)


def write_report(rows: list[dict], ceiling: float, device: str, out: Path | None) -> str:
    """Print-ready table; with `out`, also JSON and PNG files named after it."""
    card = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"
    table = format_table(rows, ceiling)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"card": card, "matmul_tflops": ceiling, "torch": torch.__version__,
                                   "results": rows}, indent=2) + "\n")
        plot(rows, out.with_suffix(".png"))
    return f"card: {card}\n{table}"
