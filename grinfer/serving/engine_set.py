"""Several engines in one server (`grinfer serve --devices cuda:0,cuda:1`): one engine per device, each with
its own model copy, KV pool and host tier; a consistent hash of the user picks the engine, so a user's K/V
live on one device, as a fleet's balancers keep a user on one replica.

`EngineSet` has the `Engine` interface the service, the metrics and the front-end workers' link use
(submit / rank, retrieve, forget_user, health, stats, start, shutdown, model_config, has_retriever), so it
stands wherever one engine does (one per model version, for instance).

- Dispatch: `HashRing` places each engine at `VNODES` points of a 64-bit hash circle; a user goes to the
  first point clockwise from the hash of its id whose engine is in the ring.
- Failure: an engine whose health fails (`Engine.health`: stopped, or `UNHEALTHY_AFTER` device turns in a
  row failed) leaves the ring, checked after each failed request and every `check_s`; only its users move
  (to the next engine clockwise), each such request counted as rehashed under its home engine. Requests
  already on the failed engine fail with its error; nothing else does.
- Rejoin: an engine out of the ring gets a small synthetic probe request every `check_s`; once its health
  is back (a probe succeeded), it rejoins and its users come home. Their K/V there may be older than the
  ones built meanwhile elsewhere; the cache's signature check (user, history version, R events) makes an
  older entry a shorter prefix or a miss, never a wrong answer.
- Retrievals that name their user go to the user's engine (its history K/V are cached there); those that
  do not go round-robin over the engines in the ring.
- Tiers: one disk tier for the whole host (`share_disk_tier`), so K/V a user's former engine spilled to
  disk are read by whichever engine owns the user now; host tiers stay per engine (see docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import itertools
import logging
import threading
from bisect import bisect
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import torch

from grinfer.config import EngineConfig
from grinfer.data.types import ItemCatalog
from grinfer.engine import Engine, EngineError, Overloaded, RankRequest, RankResult
from grinfer.engine.probe import probe_requests
from grinfer.engine.tiers import DiskTier, Held, HostTier, Tier
from grinfer.model.hstu import HSTURetrieval
from grinfer.model.mtgr import MTGR

log = logging.getLogger("grinfer.serve")
VNODES = 64  # points per engine on the ring: with 2 engines the larger share is within a few % of half
DISK_TIER_KEYS = ("disk_users", "disk_bytes_used", "disk_evictions", "disk_restores")  # the tier's, not an engine's
CHECK_S = 0.5  # how often engines' health is checked and engines out of the ring are probed


def _hash(key: str) -> int:
    """A 64-bit hash that is the same in every process (Python's hash() of a str is salted per process)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


class HashRing:
    """Consistent hash of user ids over members 0..n-1, `vnodes` points each."""

    def __init__(self, members: int, vnodes: int = VNODES):
        points = sorted((_hash(f"engine-{m}-{v}"), m) for m in range(members) for v in range(vnodes))
        self._points = [p for p, _ in points]
        self._members = [m for _, m in points]

    def owner(self, user: str, members: frozenset[int]) -> int | None:
        """The member of `members` that owns the user (the first clockwise from its hash), or None if empty."""
        start = bisect(self._points, _hash(user))
        n = len(self._points)
        for i in range(n):
            member = self._members[(start + i) % n]
            if member in members:
                return member
        return None


class SharedTier:
    """One tier used by several engines' KV caches: their threads call it under one lock, and it is closed
    when the last of them closes it (each engine closes its cache's tiers on shutdown)."""

    def __init__(self, inner: Tier, users: int):
        self.inner, self.name = inner, inner.name
        self._users = users
        self._lock = threading.Lock()

    def offload_launch(self, *args: Any, **kwargs: Any) -> None:
        """As the inner tier's (key, signature, tokens, the entry's K/V, done)."""
        with self._lock:
            self.inner.offload_launch(*args, **kwargs)

    def take(self, key: str, version: int) -> Held | None:
        with self._lock:
            return self.inner.take(key, version)

    def discard(self, key: str) -> None:
        with self._lock:
            self.inner.discard(key)

    def discard_older(self, key: str, version: int) -> None:
        with self._lock:
            self.inner.discard_older(key, version)

    def flush(self) -> None:
        with self._lock:
            self.inner.flush()

    def close(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0:
                self.inner.close()
            else:
                self.inner.flush()

    def snapshot(self) -> dict:
        with self._lock:
            return self.inner.snapshot()


def share_disk_tier(engines: Sequence[Engine]) -> None:
    """Give every engine the first engine's disk tier (the others must have been built without one): one
    directory and one LRU budget per host, whichever engine spilled an entry."""
    caches = [e.core.cache for e in engines]
    first = caches[0].tiers[0] if caches[0].tiers else None
    host = first if isinstance(first, HostTier) else None
    disk = host.lower if host is not None else first
    if not isinstance(disk, DiskTier):
        return
    shared = SharedTier(disk, len(engines))
    for cache in caches:
        top = cache.tiers[0] if cache.tiers else None
        if isinstance(top, HostTier):
            top.lower = shared
        else:
            tiers: list[Tier] = [shared]
            cache.tiers = tiers


def check_devices(devices: Sequence[str]) -> None:
    """ValueError naming `devices` when a GPU it names is not on this machine."""
    cuda = [int(d.split(":")[1]) for d in devices if d.startswith("cuda:")]
    present = torch.cuda.device_count() if cuda else 0
    missing = [f"cuda:{i}" for i in cuda if i >= present]
    if missing:
        raise ValueError(f"devices: {', '.join(missing)} not present (this machine has {present} GPU"
                         f"{'' if present == 1 else 's'})")


def build_engines(ranker: MTGR, catalog: ItemCatalog, config: EngineConfig, devices: Sequence[str],
                  retriever: HSTURetrieval | None = None) -> Engine | EngineSet:
    """One engine (a single device) or an EngineSet: `config` on each device, each engine with its own copy
    of the models (copied before the first moves them to its device), KV pool and host tier, one disk tier
    shared. The engines are not started."""
    if len(devices) == 1:
        return Engine(ranker, catalog, config.model_copy(update={"device": devices[0]}), retriever=retriever)
    models = [(ranker, retriever)] + [(copy.deepcopy(ranker), copy.deepcopy(retriever)) for _ in devices[1:]]
    engines = [Engine(model, catalog, config.model_copy(update={"device": device, "disk_cache_bytes":
                                                                config.disk_cache_bytes if i == 0 else 0}),
                      retriever=retrieval)
               for i, (device, (model, retrieval)) in enumerate(zip(devices, models))]
    share_disk_tier(engines)
    return EngineSet(engines)


def fail_engine(engine: Engine) -> Callable[[], None]:
    """Failure drills and tests: from now on every step of `engine` raises on every backend of its chain, as
    on a lost GPU (a CUDA error); returns the function that heals it."""
    runner = engine.core.runner

    def launch(*args, **kwargs):
        raise RuntimeError("CUDA error: unspecified launch failure (injected by a failure drill)")

    runner.launch = launch
    return lambda: runner.__dict__.pop("launch", None) and None


def members(engine: Engine | EngineSet) -> list[Engine]:
    """The engines behind an engine or an engine set (warm-up and device work go to each)."""
    return list(engine.engines) if isinstance(engine, EngineSet) else [engine]


class EngineSet:
    """Engines on several devices behind the one-engine interface, users dispatched by a consistent hash."""

    def __init__(self, engines: Sequence[Engine], check_s: float = CHECK_S):
        if len(engines) < 2:
            raise ValueError("devices: an engine set needs at least two engines")
        self.engines = list(engines)
        self.check_s = check_s
        self.ring = HashRing(len(self.engines))
        self._in_ring = frozenset(range(len(self.engines)))
        n = len(self.engines)
        self.counts = {"dispatched": [0] * n, "rehashed": [0] * n, "left": [0] * n, "joined": [0] * n}
        self._round_robin = itertools.count()
        self._probes: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> EngineSet:
        """Start every engine and the health monitor (idempotent)."""
        for engine in self.engines:
            engine.start()
        if self._monitor is None:
            self._stop.clear()
            self._monitor = threading.Thread(target=self._watch, name="grinfer-engine-set", daemon=True)
            self._monitor.start()
        return self

    def shutdown(self, drain: bool = True) -> None:
        """Stop the monitor, then every engine (see Engine.shutdown)."""
        self._stop.set()
        if self._monitor is not None:
            self._monitor.join()
            self._monitor = None
        for engine in self.engines:
            engine.shutdown(drain)

    def __enter__(self) -> EngineSet:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ---- requests ---------------------------------------------------------------------------
    def owner(self, user: str) -> int:
        """The index of the engine the user's requests go to now (its home engine while that is in the ring;
        with every engine out, the home engine still, so requests get its own error)."""
        owner = self.ring.owner(user, self._in_ring)
        return owner if owner is not None else self.home(user)

    def home(self, user: str) -> int:
        """The engine that owns the user when every engine is in the ring."""
        home = self.ring.owner(user, frozenset(range(len(self.engines))))
        assert home is not None  # the full ring is never empty
        return home

    def submit(self, request: RankRequest) -> Future:
        """Queue a request on the user's engine; the future resolves to its RankResult or raises an EngineError
        (a device failure comes as one saying so, which the adapters answer with 503 + Retry-After: the retry
        goes to another engine once the failing one has left the ring). An engine that turns out not to be
        running leaves the ring and the request goes to the next owner."""
        for _ in self.engines:
            index = self.owner(request.user)
            try:
                future = self.engines[index].submit(request)
            except Overloaded:
                raise
            except EngineError:
                if not self._leave_if_unhealthy(index):
                    raise
                continue
            with self._lock:
                self.counts["dispatched"][index] += 1
                home = self.home(request.user)
                if home != index:
                    self.counts["rehashed"][home] += 1
            return self._relay(index, future)
        raise EngineError("no engine is running")

    def _relay(self, index: int, inner: Future) -> Future:
        """A future that resolves as `inner` (cancelling it cancels `inner`), a failure that is not an
        EngineError turned into one naming the engine; failures are checked against the engine's health."""
        out: Future = Future()
        out.add_done_callback(lambda f: inner.cancel() if f.cancelled() else None)

        def done(f: Future) -> None:
            exc = None if f.cancelled() else f.exception()
            if exc is not None and not isinstance(exc, Overloaded):
                self._leave_if_unhealthy(index)
            if not out.set_running_or_notify_cancel():
                return
            if f.cancelled():
                out.set_exception(EngineError("the request was cancelled"))
            elif exc is None:
                out.set_result(f.result())
            elif isinstance(exc, EngineError):
                out.set_exception(exc)
            else:
                out.set_exception(EngineError(f"engine {index} ({self.engines[index].device}) failed: "
                                              f"{type(exc).__name__}: {exc}; retry (other engines serve its "
                                              "users once it leaves the ring)"))

        inner.add_done_callback(done)
        return out

    async def rank(self, request: RankRequest) -> RankResult:
        """Score a request on the user's engine (awaitable)."""
        return await asyncio.wrap_future(self.submit(request))

    def rank_sync(self, request: RankRequest, timeout: float | None = None) -> RankResult:
        """Blocking twin of `rank`."""
        return self.submit(request).result(timeout)

    def submit_retrieval(self, context, n: int, user: str | None = None, version: int = 0) -> Future:
        """Queue a retrieval on the user's engine (which caches their history K/V), or without a user on the
        next engine in the ring (round-robin)."""
        if user is not None:
            return self.engines[self.owner(user)].submit_retrieval(context, n, user, version)
        ring = sorted(self._in_ring) or list(range(len(self.engines)))
        return self.engines[ring[next(self._round_robin) % len(ring)]].submit_retrieval(context, n)

    async def retrieve(self, context, n: int, user: str | None = None, version: int = 0):
        """Top-n unseen items for the context (as Engine.retrieve), on the user's engine or one of them."""
        return await asyncio.wrap_future(self.submit_retrieval(context, n, user, version))

    def forget_user(self, user: str, before_version: int) -> Future:
        """Free the user's K/V of older history versions on every engine (a user re-hashed after a failure may
        have entries on two); the future resolves to whether any device entry went."""
        futures = [engine.forget_user(user, before_version) for engine in self.engines if engine.running]
        out: Future = Future()
        if not futures:
            out.set_result(False)
            return out
        remaining = [len(futures)]
        lock = threading.Lock()

        def done(_: Future) -> None:
            with lock:
                remaining[0] -= 1
                last = remaining[0] == 0
            if last:
                errors = [f.exception() for f in futures if f.exception() is not None]
                if errors:
                    out.set_exception(errors[0])
                else:
                    out.set_result(any(f.result() for f in futures))

        for future in futures:
            future.add_done_callback(done)
        return out

    # ---- state ------------------------------------------------------------------------------
    @property
    def model_config(self):
        """The ranking model's ModelConfig (every engine serves the same model)."""
        return self.engines[0].model_config

    @property
    def has_retriever(self) -> bool:
        return self.engines[0].has_retriever

    @property
    def running(self) -> bool:
        """Whether any engine accepts requests."""
        return any(engine.running for engine in self.engines)

    @property
    def on_step(self) -> Callable[[dict], None] | None:
        return self.engines[0].on_step

    @on_step.setter
    def on_step(self, hook: Callable[[dict], None] | None) -> None:
        for engine in self.engines:
            engine.on_step = hook

    @property
    def in_ring(self) -> list[int]:
        """Indices of the engines users are dispatched to now."""
        return sorted(self._in_ring)

    def health(self) -> str | None:
        """None while any engine in the ring serves; else why none does."""
        problems = []
        for i, engine in enumerate(self.engines):
            problem = engine.health()
            if problem is None and i in self._in_ring:
                return None
            problems.append(f"engine {i} ({engine.device}): {problem or 'out of the ring'}")
        return "; ".join(problems)

    def stats(self) -> dict:
        """Each engine's stats under "engines" (with its index, whether it is in the ring and its dispatch
        counts), their sums at the top level, and the first engine's backend chain and probes."""
        with self._lock:
            counts = {k: list(v) for k, v in self.counts.items()}
        engines = [{**engine.stats(), "engine": i, "in_ring": i in self._in_ring,
                    **{name: values[i] for name, values in counts.items()}}
                   for i, engine in enumerate(self.engines)]
        first = engines[0]
        total = {key: sum(e[key] for e in engines) for key in ("waiting", "running", "steps", "failures",
                                                               "device_bytes")}
        return {**total, "kv_cache": _sum_kv(e["kv_cache"] for e in engines), "strategy": first["strategy"],
                "probes": first["probes"], "backend": first["backend"], "pipeline_depth": first["pipeline_depth"],
                "device": ",".join(e["device"] for e in engines), "engines": engines}

    # ---- the ring ---------------------------------------------------------------------------
    def _leave_if_unhealthy(self, index: int) -> bool:
        """Take the engine out of the ring if its health fails; whether it is out."""
        problem = self.engines[index].health()
        if problem is None:
            return False
        with self._lock:
            if index not in self._in_ring:
                return True
            self._in_ring = self._in_ring - {index}
            self.counts["left"][index] += 1
        log.error("engine %d (%s) left the ring: %s; its users go to the others", index,
                  self.engines[index].device, problem)
        return True

    def _join(self, index: int) -> None:
        with self._lock:
            if index in self._in_ring:
                return
            self._in_ring = self._in_ring | {index}
            self.counts["joined"][index] += 1
        log.warning("engine %d (%s) is healthy again: it rejoined the ring", index, self.engines[index].device)

    def _watch(self) -> None:
        while not self._stop.wait(self.check_s):
            for index, engine in enumerate(self.engines):
                if index in self._in_ring:
                    self._leave_if_unhealthy(index)
                elif engine.health() is None:
                    self._join(index)
                elif engine.running:
                    self._probe(index)

    def _probe(self, index: int) -> None:
        """One small synthetic request to an engine out of the ring (a success heals its health)."""
        pending = self._probes.get(index)
        if pending is not None and not pending.done():
            return
        engine = self.engines[index]
        request, = probe_requests(engine.retriever.num_items, engine.core.num_profile_tokens, batch=1,
                                  num_static=4, num_realtime=1, candidates=4, tag=f"-ring{index}")
        try:
            self._probes[index] = engine.submit(request)
        except EngineError as exc:
            log.debug("probe of engine %d not queued: %s", index, exc)


def _sum_kv(snapshots) -> dict:
    """KV-cache stats of several engines as one: counts summed, ratios recomputed, the shared disk tier's own
    numbers (the same in every engine's snapshot) taken once."""
    snapshots = list(snapshots)
    ratios = ("hit_ratio", "occupancy", "block_size")
    out: dict[str, float] = {key: sum(s[key] for s in snapshots) for key in snapshots[0] if key not in ratios}
    out.update({key: max(s[key] for s in snapshots) for key in DISK_TIER_KEYS})
    lookups = out["hits"] + out["partial_hits"] + out["misses"]
    out["hit_ratio"] = (out["hits"] + out["partial_hits"]) / lookups if lookups else 0.0
    out["occupancy"] = sum(s["occupancy"] * s["blocks"] for s in snapshots) / max(out["blocks"], 1)
    out["block_size"] = snapshots[0]["block_size"]
    return out
