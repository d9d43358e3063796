"""`--backend auto`: build every backend the device offers, check each against `eager` on a probe batch,
time each on a representative batch, and serve with the fastest healthy one.

The probe batch is synthetic (random events over the catalogue, the demo's sizes): every backend gets the
same requests — a cold batch, then the same users back with 2 new events — so cached backends are timed
on the traffic they serve most (warm) and uncached ones pay for recomputing the whole context.
Tolerances: float32 1e-5 absolute on probabilities; bf16 / fp16 1e-2 relative (|p - p_eager| / |p_eager|
over each request's probabilities, in the L2 norm).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from grinfer.config import EngineConfig
from grinfer.data.types import ItemCatalog
from grinfer.engine.core import EngineCore
from grinfer.engine.request import RankRequest
from grinfer.features.featurizer import UserContext
from grinfer.model.mtgr import MTGR

log = logging.getLogger("grinfer.engine")
PROBE_KV_BYTES = 64 << 20
PROBE_BUDGET_S = 30.0  # per backend: its build and check must finish within it, its timed rounds stop there


@dataclass
class Probe:
    """One backend's probe: whether it matches eager, how far, how fast, how long it took to get ready."""

    backend: str
    healthy: bool
    probe_ms: float | None = None  # median time of the representative batches (cold, then warm)
    max_error: float | None = None  # vs eager: absolute (float32) or relative (bf16 / fp16)
    ready_s: float | None = None  # build + first (compiling) run
    error: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def available_backends(device: torch.device) -> list[str]:
    """The backends that can run on `device` here (eager first; aoti on the CPU with a C++ compiler; onnx where
    onnxruntime is installed)."""
    names = ["eager"]
    if _has_cpp_compiler() or device.type == "cuda":
        names.append("compiled")
    if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        names.append("fused")
    if device.type == "cpu" and _has_cpp_compiler():  # the packaged step is compiled C++ for the CPU here
        names.append("aoti")
    if importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None:
        names.append("onnx")
    return names


def synthetic_context(rng: np.random.Generator, num_items: int, num_profile: int, num_static: int,
                      num_realtime: int) -> UserContext:
    """A random context: `num_static` + `num_realtime` time-ordered events over the catalogue."""
    n = num_static + num_realtime
    stamps = 978_300_000 + np.cumsum(rng.integers(0, 5000, size=n))
    return UserContext(np.zeros(num_profile, np.int64), rng.integers(1, num_items + 1, size=n).astype(np.int64),
                       stamps.astype(np.int64), rng.integers(1, 6, size=n).astype(np.int64), num_static)


def probe_requests(num_items: int, num_profile: int, batch: int = 8, num_static: int = 60, num_realtime: int = 5,
                   candidates: int = 100, seed: int = 0, tag: str = "") -> list[RankRequest]:
    rng = np.random.default_rng(seed)
    cands = min(candidates, num_items)
    return [RankRequest(f"__probe{tag}-{u}", 0,
                        synthetic_context(rng, num_items, num_profile, num_static, num_realtime),
                        rng.choice(np.arange(1, num_items + 1), cands, replace=False), 1_000_000_000)
            for u in range(batch)]


def probe_backends(model: MTGR, catalog: ItemCatalog, config: EngineConfig, names: list[str],
                   repeats: int = 5, budget_s: float = PROBE_BUDGET_S, skipped: dict[str, str] | None = None
                   ) -> list[Probe]:
    """Probe each backend in `names` (eager is always probed first: it is the reference).

    Bounded: a backend other than eager whose build and first (checking) batch take longer than `budget_s`
    is reported "not probed: over budget" and left to finish on its thread at the lowest priority (a
    torch.compile that finishes fills Inductor's cache, so the next start builds it faster); a backend's timed
    rounds stop once `budget_s` has passed since its build began (at least one is timed). `skipped` names
    backends reported without being built ({name: why}), e.g. one whose export is still running."""
    names, skipped = ["eager", *[n for n in names if n != "eager"]], skipped or {}
    num_profile = len(model.cfg.profile_cardinalities)
    check = probe_requests(catalog.num_items, num_profile, tag="check")
    reference, probes = None, []
    for name in names:
        if name in skipped and name != "eager":  # eager is the reference: always built
            probes.append(Probe(name, False, error=f"not probed: {skipped[name]}"))
            continue
        start = time.perf_counter()
        try:
            built = _within(None if name == "eager" else budget_s, lambda name=name: _build(model, catalog, config,
                                                                                           name, check))
            if built is None:
                probes.append(Probe(name, False, ready_s=budget_s, error=f"not probed: over budget (its build "
                                                                          f"took more than {budget_s:g} s)"))
                continue
            core, got = built
            ready_s = time.perf_counter() - start
            if reference is None:
                reference = got
            error = _error(got, reference, config.dtype)
            tolerance = 1e-5 if config.dtype == "float32" else 1e-2
            if not np.isfinite(error) or error > tolerance:
                raise ValueError(f"disagrees with eager by {error:.3g} (tolerance {tolerance:g})")
            seconds = []
            for r in range(repeats):  # a cold batch, then the same users back with 2 new events each
                if seconds and time.perf_counter() - start > budget_s:
                    break
                batch = probe_requests(catalog.num_items, num_profile, seed=r + 1, tag=f"{name}{r}")
                t0 = time.perf_counter()
                _scores(core, batch)
                _scores(core, [_returning(q, catalog.num_items, r) for q in batch])
                seconds.append(time.perf_counter() - t0)
            probes.append(Probe(name, True, 1e3 * float(np.median(seconds)), error, ready_s))
            core.close()
        except Exception as exc:  # a backend that cannot run here is reported, never fatal
            probes.append(Probe(name, False, ready_s=time.perf_counter() - start,
                                error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"))
            if name == "eager":
                raise
    return probes


def _build(model: MTGR, catalog: ItemCatalog, config: EngineConfig, name: str, check: list[RankRequest]):
    """A probe engine on backend `name` and its scores of the check batch (its first run: compiles happen here)."""
    core = EngineCore(model, catalog, config.model_copy(update={
        "backend": name, "kv_cache_bytes": PROBE_KV_BYTES, "host_cache_bytes": 0, "disk_cache_bytes": 0,
        "pipeline_depth": 1, "fallback": False}))
    return core, _scores(core, check)


def _within(budget_s: float | None, fn):
    """fn() on a daemon thread, waited for up to `budget_s` (None: no limit); None if it took longer (the thread
    goes on at the lowest CPU priority, its result dropped). Its exception is raised here."""
    if budget_s is None:
        return fn()
    result: dict = {}

    def run():
        result["tid"] = threading.get_native_id()
        try:
            result["value"] = fn()
        except BaseException as exc:  # handed to the caller
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True, name="grinfer-probe")
    thread.start()
    thread.join(budget_s)
    if thread.is_alive():
        try:
            os.setpriority(os.PRIO_PROCESS, result["tid"], 19)  # Linux: that thread only
        except (AttributeError, KeyError, OSError):
            pass
        return None
    if "error" in result:
        raise result["error"]
    return result["value"]


def choose(probes: list[Probe]) -> Probe:
    """The fastest healthy probe."""
    return min((p for p in probes if p.healthy), key=lambda p: p.probe_ms or 0.0)


def format_probes(probes: list[Probe], chosen: str) -> str:
    """The probe table for the log."""
    lines = [f"{'backend':<10} {'healthy':>7} {'probe ms':>9} {'max err':>9} {'ready s':>8}  note"]
    for p in probes:
        ms = f"{p.probe_ms:9.2f}" if p.probe_ms is not None else f"{'-':>9}"
        err = f"{p.max_error:9.2e}" if p.max_error is not None else f"{'-':>9}"
        note = "serving" if p.backend == chosen else (p.error or "")
        lines.append(f"{p.backend:<10} {str(p.healthy).lower():>7} {ms} {err} {p.ready_s or 0:8.1f}  {note}")
    return "\n".join(lines)


def _returning(request: RankRequest, num_items: int, seed: int, new_events: int = 2) -> RankRequest:
    """The same user back with `new_events` more real-time events (what most served traffic looks like)."""
    rng, ctx = np.random.default_rng(seed), request.context
    stamps = ctx.timestamps[-1] + np.cumsum(rng.integers(1, 600, new_events))
    context = UserContext(ctx.profile, np.r_[ctx.items, rng.integers(1, num_items + 1, new_events)],
                          np.r_[ctx.timestamps, stamps], np.r_[ctx.ratings, rng.integers(1, 6, new_events)],
                          ctx.num_static)
    return RankRequest(request.user, request.history_version, context, request.candidates, int(stamps[-1]) + 60)


def _scores(core: EngineCore, requests: list[RankRequest]) -> list[torch.Tensor]:
    states = [core.add(RankRequest(r.user, r.history_version, r.context, r.candidates, r.request_ts))
              for r in requests]
    results = {id(s): res for s, res in core.run_until_done()}
    out = []
    for s in states:
        res = results[id(s)]
        if isinstance(res, BaseException):
            raise res
        out.append(res.probabilities)
    return out


def _error(got: list[torch.Tensor], reference: list[torch.Tensor], dtype: str) -> float:
    if dtype == "float32":
        return max(float((g - r).abs().max()) for g, r in zip(got, reference))
    return max(float((g - r).norm() / r.norm().clamp_min(1e-12)) for g, r in zip(got, reference))


def _has_cpp_compiler() -> bool:
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
        return True
    except Exception:
        return False
