"""`ModelSet`: several model versions served at once, each request routed to its user's A/B arm.

It has the `Engine` interface (submit / rank, retrieve, forget_user, health, stats, start, shutdown,
model_config), so the service, the metrics and the front-end workers' link use it as they use one engine.
Inside it, each loaded version is its own engine object (an `Engine`, or an `EngineSet` over several
devices) with its own KV cache: a user's K/V computed by one version are never read by another.

- Routing: the serving plan (registry/plan.py) gives each user an arm by a stable hash, or the arm a
  request forces (`RankRequest.arm`); the answer carries the arm and the version (`RankResult.arm`,
  `.model_version`). Retrievals go to the production version.
- Swaps (`apply(plan)`): versions the new plan needs are loaded beside the serving ones and warmed (the
  loader does both), then the plan switches in one step under the lock, then versions no longer needed
  drain (their in-flight requests finish) and shut down. No request is answered by a half-loaded version,
  and none is refused for the swap.
- In the background, after an answer: the shadow version (if the plan has one) scores a sampled copy
  (shadow.py), and a sampled request is recomputed uncached (consistency.py); both give way under load.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from grinfer.data.types import ItemCatalog
from grinfer.engine import Engine, RankRequest, RankResult
from grinfer.registry.plan import ServingPlan
from grinfer.registry.records import ModelVersion, RegistryError
from grinfer.serving.arm_stats import ArmStats
from grinfer.serving.consistency import ConsistencyCheck
from grinfer.serving.engine_set import EngineSet, members
from grinfer.serving.service import FieldError
from grinfer.serving.shadow import ShadowScorer

log = logging.getLogger("grinfer.serve")
Served = Engine | EngineSet  # what serves one version: an engine, or one per device
Loader = Callable[[ModelVersion, float], Served]  # (version, KV share) -> a started, warmed engine
BUSY_INFLIGHT = 32  # a version with more requests in flight is busy: background work gives way
DRAIN_TIMEOUT_S = 60.0


@dataclass
class Loaded:
    """One loaded version: its engine, requests in flight, when it loaded and its consistency check."""

    key: str
    engine: Served
    share: float
    check: ConsistencyCheck | None = None
    inflight: int = 0
    loaded_at: float = field(default_factory=time.time)


def kv_share(plan: ServingPlan, key: str, split: float) -> float:
    """The fraction of the KV budget version `key` gets: production 1 - split, the others split evenly
    between them (split 0: every version gets all of it)."""
    if not split:
        return 1.0
    if key == plan.production.key:
        return 1.0 - split
    return split / max(1, len(plan.versions()) - 1)


class ModelSet:
    """The loaded versions of one model behind the Engine interface (see the module docstring)."""

    def __init__(self, plan: ServingPlan, engines: Mapping[str, Served], catalog: ItemCatalog,
                 loader: Loader | None = None, kv_split: float = 0.0, consistency_fraction: float = 0.0,
                 weights: torch.Tensor | None = None):
        missing = set(plan.versions()) - set(engines)
        if missing:
            raise ValueError(f"engines: no engine for {sorted(missing)}")
        self.catalog, self.loader, self.kv_split = catalog, loader, kv_split
        self.consistency_fraction = consistency_fraction
        self.weights = weights  # the service's task weights for the shadow's fused scores (None: equal)
        self.plan = plan
        self._loaded = {key: self._wrap(key, engine, kv_share(plan, key, kv_split)) for key, engine in engines.items()}
        self.shadow = self._shadow_for(plan)
        self.arm_stats = ArmStats()
        self.swaps: list[dict] = []
        self._on_step: Callable[[dict], None] | None = None
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        self._apply_lock = threading.Lock()

    def _wrap(self, key: str, engine: Served, share: float) -> Loaded:
        check = None
        if self.consistency_fraction:
            check = ConsistencyCheck(members(engine)[0], self.catalog, self.consistency_fraction)
        return Loaded(key, engine, share, check)

    def _shadow_for(self, plan: ServingPlan) -> ShadowScorer | None:
        return ShadowScorer(plan.shadow_fraction, self.weights) if plan.shadow is not None else None

    # ---- the Engine interface -----------------------------------------------------------------
    @property
    def production(self) -> Served:
        """The production version's engine."""
        return self._loaded[self.plan.production.key].engine

    @property
    def model_config(self):
        return self.production.model_config

    @property
    def has_retriever(self) -> bool:
        return self.production.has_retriever

    @property
    def running(self) -> bool:
        return self.production.running

    @property
    def on_step(self) -> Callable[[dict], None] | None:
        return self._on_step

    @on_step.setter
    def on_step(self, hook: Callable[[dict], None] | None) -> None:
        self._on_step = hook
        for loaded in self._versions():
            loaded.engine.on_step = hook

    def _versions(self) -> list[Loaded]:
        with self._lock:
            return list(self._loaded.values())

    def engines_by_version(self) -> list[Served]:
        """The loaded versions' engines, production first."""
        with self._lock:
            production = self.plan.production.key
            return [v.engine for v in sorted(self._loaded.values(), key=lambda v: v.key != production)]

    def start(self) -> ModelSet:
        for loaded in self._versions():
            loaded.engine.start()
        return self

    def shutdown(self, drain: bool = True) -> None:
        for loaded in self._versions():
            loaded.engine.shutdown(drain)

    def submit(self, request: RankRequest) -> Future:
        """Queue the request on its arm's version; the future resolves to a RankResult naming arm and version."""
        with self._lock:
            plan = self.plan
            try:
                arm = plan.arm_for(request.user, request.arm)
            except RegistryError as exc:
                raise FieldError(exc.field, str(exc).split(": ", 1)[1]) from None
            loaded = self._loaded[arm.key]
            loaded.inflight += 1
        start = time.monotonic()
        try:
            inner = loaded.engine.submit(request)
        except BaseException:
            self._done(loaded)
            raise
        outer: Future = Future()
        outer.add_done_callback(lambda f: inner.cancel() if f.cancelled() else None)
        inner.add_done_callback(lambda f: self._answered(f, outer, request, plan, arm.name, loaded, start))
        return outer

    async def rank(self, request: RankRequest) -> RankResult:
        return await asyncio.wrap_future(self.submit(request))

    def rank_sync(self, request: RankRequest, timeout: float | None = None) -> RankResult:
        return self.submit(request).result(timeout)

    def submit_retrieval(self, context, n: int, *args) -> Future:
        """Retrievals go to the production version (the arms rank what it retrieves)."""
        return self.production.submit_retrieval(context, n, *args)

    async def retrieve(self, context, n: int, *args):
        return await asyncio.wrap_future(self.submit_retrieval(context, n, *args))

    def forget_user(self, user: str, before_version: int) -> Future:
        """Free the user's older K/V in every loaded version; the future is the production version's."""
        futures = [engine.forget_user(user, before_version) for engine in self.engines_by_version()]
        return futures[0]  # production first

    def health(self) -> str | None:
        """None when every loaded version serves; else the first one's problem, naming it."""
        for loaded in self._versions():
            problem = loaded.engine.health()
            if problem is not None:
                return f"model {loaded.key}: {problem}"
        return None

    @property
    def probes(self) -> list[dict]:
        return self.production.stats().get("probes", [])

    def stats(self) -> dict:
        """The production version's engine stats, with everything about the set under "models"."""
        return {**self.production.stats(), "models": self.describe()}

    # ---- the answer path ----------------------------------------------------------------------
    def _done(self, loaded: Loaded) -> None:
        with self._lock:
            loaded.inflight -= 1
            self._drained.notify_all()

    def _answered(self, inner: Future, outer: Future, request: RankRequest, plan: ServingPlan, arm: str,
                  loaded: Loaded, start: float) -> None:
        error = None if inner.cancelled() else inner.exception()
        self.arm_stats.observe(arm, loaded.key, time.monotonic() - start, ok=error is None and not inner.cancelled())
        try:
            if inner.cancelled() or not outer.set_running_or_notify_cancel():
                return
            if error is not None:
                outer.set_exception(error)
                return
            result = dataclasses.replace(inner.result(), arm=arm, model_version=loaded.key)
            outer.set_result(result)
            self._background(request, result, plan, loaded)
        finally:
            self._done(loaded)

    def _background(self, request: RankRequest, result: RankResult, plan: ServingPlan, loaded: Loaded) -> None:
        """The sampled shadow copy and consistency check of an answered request (production's answers only
        feed the shadow)."""
        busy = loaded.inflight > BUSY_INFLIGHT
        if loaded.check is not None:
            loaded.check.offer(request, result, busy)
        shadow, scorer = plan.shadow, self.shadow
        if shadow is None or scorer is None or loaded.key != plan.production.key:
            return
        with self._lock:
            target = self._loaded.get(shadow.key)
            if target is None:
                return
            target.inflight += 1
        try:
            done = scorer.offer(request, result.probabilities, target.engine.submit, busy)
        except BaseException:
            self._done(target)
            raise
        if done is None:
            self._done(target)
        else:
            done.add_done_callback(lambda _: self._done(target))

    # ---- swaps --------------------------------------------------------------------------------
    def apply(self, plan: ServingPlan) -> dict:
        """Serve `plan`: load and warm what it adds, switch, drain and unload what it drops (see the module
        docstring). Returns the swap's record: versions added and removed, seconds to load, switch and drain."""
        if self.loader is None:
            raise RuntimeError("this model set has no loader: it serves a fixed set of versions")
        with self._apply_lock:
            started = time.monotonic()
            with self._lock:
                current = dict(self._loaded)
            added: dict[str, Loaded] = {}
            try:
                for key, version in plan.versions().items():
                    if key not in current:
                        share = kv_share(plan, key, self.kv_split)
                        log.info("loading %s beside the serving versions (KV share %.2f)", key, share)
                        added[key] = self._wrap(key, self.loader(version, share), share)
                        added[key].engine.on_step = self._on_step
            except BaseException:
                for loaded in added.values():
                    loaded.engine.shutdown(drain=False)
                raise
            loaded_s = time.monotonic() - started
            with self._lock:
                self._loaded.update(added)
                old = self.plan
                if (plan.shadow, plan.shadow_fraction) != (old.shadow, old.shadow_fraction):
                    self.shadow = self._shadow_for(plan)
                self.plan = plan
                retired = [self._loaded.pop(key) for key in list(self._loaded) if key not in plan.versions()]
            switched = time.monotonic()
            for loaded in retired:
                self._drain(loaded)
            record = {"at": time.time(), "from": old.describe(), "to": plan.describe(), "added": sorted(added),
                      "removed": [r.key for r in retired], "load_s": loaded_s,
                      "drain_s": time.monotonic() - switched}
            self.swaps.append(record)
            log.info("serving plan switched: production %s, arms %s; added %s, removed %s (load %.1f s, drain "
                     "%.2f s)", plan.production.key, [a.name for a in plan.arms], record["added"], record["removed"],
                     loaded_s, record["drain_s"])
            return record

    def _drain(self, loaded: Loaded) -> None:
        """Wait for the version's in-flight requests (up to DRAIN_TIMEOUT_S), then shut its engine down."""
        with self._lock:
            self._drained.wait_for(lambda: loaded.inflight == 0, timeout=DRAIN_TIMEOUT_S)
            left = loaded.inflight
        if left:
            log.warning("%s still had %d requests in flight after %.0f s; they finish during shutdown", loaded.key,
                        left, DRAIN_TIMEOUT_S)
        loaded.engine.shutdown(drain=True)

    # ---- reports ------------------------------------------------------------------------------
    def describe(self) -> dict:
        """Plain data about the set: the plan, each loaded version, per-arm counts, shadow, checks, swaps."""
        with self._lock:
            plan, loaded, shadow = self.plan, list(self._loaded.values()), self.shadow
        roles = {a.key: "arm" for a in plan.arms}
        if plan.shadow is not None:
            roles.setdefault(plan.shadow.key, "shadow")
        roles[plan.production.key] = "production"
        return {"plan": plan.describe(), "arms": self.arm_stats.snapshot(),
                "versions": [{"model_version": v.key, "role": roles.get(v.key, "draining"), "inflight": v.inflight,
                              "kv_share": v.share, "loaded_at": v.loaded_at,
                              "consistency": None if v.check is None else v.check.stats()} for v in loaded],
                "shadow": None if shadow is None or plan.shadow is None else
                {"model_version": plan.shadow.key, **shadow.stats()},
                "swaps": self.swaps[-10:]}
