"""RecommenderService: the transport-free operations behind REST and gRPC.

It turns API requests into engine requests: user data from the FeatureCache or the UserStore, the
featurizer's context (S = static history, R = real-time events), catalogue ids <-> model ids, and
the engine's probabilities back into sorted, fused scores.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass

import numpy as np
import torch

from grinfer.data.types import PROFILE_FIELDS, ItemCatalog
from grinfer.engine import Engine
from grinfer.engine.request import RankRequest
from grinfer.features.featurizer import UserContext
from grinfer.recommend import fused_score
from grinfer.schema import (
    EventIn,
    EventOut,
    EventsIn,
    EventsOut,
    RankIn,
    RankOut,
    RecommendIn,
    RollIn,
    RollOut,
    UserOut,
    UsersOut,
    UsersQuery,
)
from grinfer.serving.admission import Admission
from grinfer.serving.phases import Phases
from grinfer.storage.base import Event, FeatureCache, IdempotencyConflict, Unavailable, UserRecord, UserStore
from grinfer.storage.checked import RevisionCheckedStore
from grinfer.storage.resilient import health_of

log = logging.getLogger("grinfer.serve")
# the A/B arm an admin forces for the request being handled (X-Grinfer-Arm; set by the adapters, read by _rank)
FORCED_ARM: ContextVar[str | None] = ContextVar("forced_arm", default=None)
USER_ID_RE = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")
MAX_CATALOGUE_RANK = 2000  # without a retrieval model, /recommend ranks the whole catalogue up to this size


class FieldError(ValueError):
    """A request field the service cannot accept (e.g. an item not in the catalogue)."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(message)
        self.field, self.status = field, status

    def __reduce__(self):  # pickles whole: it crosses from the engine process to the workers (engine_link.py)
        return FieldError, (self.field, str(self), self.status)


@dataclass
class ServiceSettings:
    max_static: int = 1000
    max_realtime: int = 100
    user_ttl_s: float = 30.0
    task_weights: dict[str, float] | None = None
    latency_target_s: float | None = None  # admission keeps requests in flight under rate x this (None: all)
    replica: str = "grinfer"  # this replica's name (X-Grinfer-Replica, gRPC trailing metadata x-grinfer-replica)


def check_user_header(header: str | None, user: str) -> None:
    """A balancer routes by the X-User-Id header (gRPC: x-user-id metadata): it must name the body's user."""
    if header is not None and header != user:
        raise FieldError("user", f"{user!r} differs from the X-User-Id header {header!r}; send the same user in both")


class RecommenderService:
    """Rank, recommend, append events, roll history and read users; safe to call concurrently."""

    def __init__(self, engine: Engine, catalog: ItemCatalog, store: UserStore, cache: FeatureCache,
                 settings: ServiceSettings = ServiceSettings(), model_name: str = "model"):
        self.engine, self.catalog, self.store, self.cache = engine, catalog, store, cache
        self.settings, self.model_name = settings, model_name
        self.admission = Admission(settings.latency_target_s)
        cfg = engine.model_config
        self.tasks = cfg.tasks
        weights = settings.task_weights or {}
        self.weights = torch.tensor([weights.get(t, 1.0) for t in self.tasks])
        self.num_profile = len(cfg.profile_cardinalities)
        self.dense_of = {int(raw): i for i, raw in enumerate(catalog.raw_ids) if i > 0}
        # per-user write epochs: a reader that raced a write must not put its stale copy in the cache
        self._epochs: defaultdict[str, int] = defaultdict(int)
        self._epoch_lock = threading.Lock()
        # called with (user, new history version) after a roll folded events (fleet.py: frees stale K/V fleet-wide)
        self.on_roll: Callable[[str, int], None] | None = None

    # ---- ids and users -------------------------------------------------------------------------
    def to_dense(self, items: list[int], field: str, unique: bool = False) -> np.ndarray:
        """Catalogue ids -> model ids; unknown (or, with unique, repeated) ids raise FieldError naming the index."""
        out = np.empty(len(items), np.int64)
        seen: dict[int, int] = {}
        for i, item in enumerate(items):
            dense = self.dense_of.get(item)
            if dense is None:
                raise FieldError(f"{field}.{i}.item", f"item {item} is not in the catalogue")
            if unique and item in seen:
                raise FieldError(f"{field}.{i}.item", f"item {item} is already candidate {seen[item]}")
            seen[item] = i
            out[i] = dense
        return out

    def to_raw(self, dense: int) -> int:
        return int(self.catalog.raw_ids[dense])

    def user_record(self, user: str) -> tuple[UserRecord, bool]:
        """The user's data (cache first), or an empty cold-start record for an unknown user."""
        record = self.cache.get_user(user)
        if record is None:
            epoch = self._epochs[user]
            record = self.store.get_user(user)
            with self._epoch_lock:
                if record is not None and self._epochs[user] == epoch and self.settings.user_ttl_s > 0:
                    self.cache.put_user(record, self.settings.user_ttl_s)
        if record is None:
            return UserRecord(user, [0] * self.num_profile), True
        return record, False

    async def load_user(self, user: str) -> tuple[UserRecord, bool]:
        """`user_record` from the event loop: an in-process cache hit, or a held record whose revision a local
        store confirms, is read inline; the rest in a thread (under load, a thread's answer waits for the busy
        loop: ~4 ms against ~0.1 ms inline, see BENCHMARKS)."""
        if self.cache.in_process:
            record = self.cache.get_user(user)
            if record is not None:
                return record, False
        if isinstance(self.store, RevisionCheckedStore) and self.store.checks_inline:
            record = self.store.current(user)
            if record is not None:
                return record, False
        return await asyncio.to_thread(self.user_record, user)

    def context(self, record: UserRecord, extra: Sequence[Event] = ()) -> UserContext:
        """S = the last max_static static events; R = the last max_realtime real-time (+ extra) events."""
        static = record.static[-self.settings.max_static:] if self.settings.max_static else []
        realtime = (list(record.realtime) + list(extra))[-self.settings.max_realtime:]
        events = static + realtime
        profile = (list(record.profile) + [0] * self.num_profile)[:self.num_profile]
        return UserContext(np.asarray(profile, np.int64), np.array([e.item for e in events], np.int64),
                           np.array([e.ts for e in events], np.int64), np.array([e.action for e in events], np.int64),
                           num_static=len(static))

    def _events(self, events: list[EventIn], field: str) -> list[Event]:
        dense = self.to_dense([e.item for e in events], field)
        now = int(time.time())
        return [Event(int(d), e.ts if e.ts is not None else now, e.action) for d, e in zip(dense, events)]

    # ---- operations ----------------------------------------------------------------------------
    async def rank(self, req: RankIn, phases: Phases | None = None) -> RankOut:
        """Score the given candidates for the user, best first (`phases` gets where the time went); refused
        at once with Overloaded when the server is saturated (admission.py)."""
        with self.admission.admit_here(req.deadline_ms):
            return await self._rank_given(req, phases or Phases())

    async def recommend(self, req: RecommendIn, phases: Phases | None = None) -> RankOut:
        """Retrieval top-N over the catalogue, ranked by MTGR, top-k (`phases` gets where the time went);
        refused at once with Overloaded when the server is saturated."""
        with self.admission.admit_here(req.deadline_ms):
            return await self._recommend(req, phases or Phases())

    async def _rank_given(self, req: RankIn, phases: Phases) -> RankOut:
        start = time.perf_counter()
        candidates = self.to_dense([c.item for c in req.candidates], "candidates", unique=True)
        extra = self._events(req.events, "events")
        phases.mark("features")
        record, cold = await self.load_user(req.user)
        phases.mark("user")
        return await self._rank(req.user, record, cold, self.context(record, extra), candidates,
                                req.deadline_ms, start, len(candidates), phases)

    async def _recommend(self, req: RecommendIn, phases: Phases) -> RankOut:
        start = time.perf_counter()
        record, cold = await self.load_user(req.user)
        phases.mark("user")
        ctx = self.context(record)
        if not self.engine.has_retriever and self.catalog.num_items > MAX_CATALOGUE_RANK:
            raise Unavailable("no retrieval model is loaded and the catalogue is too large to rank whole")
        assert req.retrieve is not None  # RecommendIn's validator fills in the default
        # on the engine's thread, batched; the user's history K/V cached per history version
        candidates = await self.engine.retrieve(ctx, req.retrieve, req.user, record.history_version)
        phases.mark("retrieve")
        if len(candidates) == 0:
            return RankOut(user=req.user, items=[], cache="none", history_version=record.history_version,
                           cold_start=cold, latency_ms=1e3 * (time.perf_counter() - start))
        return await self._rank(req.user, record, cold, ctx, candidates, req.deadline_ms, start, req.k, phases)

    async def _rank(self, user: str, record: UserRecord, cold: bool, ctx: UserContext, candidates: np.ndarray,
                    deadline_ms: int | None, start: float, k: int, phases: Phases) -> RankOut:
        # deadline_ms counts from the request's arrival (start), not from when it reaches the engine
        deadline = time.monotonic() - (time.perf_counter() - start) + deadline_ms / 1e3 if deadline_ms else None
        request = RankRequest(user, record.history_version, ctx, candidates, int(time.time()), deadline=deadline,
                              arm=FORCED_ARM.get())
        result = await self.engine.rank(request)
        phases.mark("engine")
        probs = result.probabilities
        fused = fused_score(probs, self.weights)
        order = torch.argsort(fused, descending=True)[:k]
        # plain Python values in one conversion each (per-element tensor indexing costs ~1 us a value)
        scores, rows, dense = fused[order].tolist(), probs[order].tolist(), candidates[order.numpy()].tolist()
        raw, titles, tasks = self.catalog.raw_ids, self.catalog.titles, self.tasks
        items = [{"item": int(raw[d]), "score": score, "probabilities": dict(zip(tasks, row)), "title": titles[d]}
                 for d, score, row in zip(dense, scores, rows)]
        out = RankOut.model_validate({"user": user, "items": items, "cache": result.cache,  # one call into Rust
                                      "history_version": record.history_version, "cold_start": cold,
                                      "latency_ms": 1e3 * (time.perf_counter() - start),
                                      "arm": result.arm, "model_version": result.model_version})
        log.debug("ranked user=%s arm=%s model_version=%s cache=%s", user, result.arm, result.model_version,
                  result.cache)
        phases.mark("respond")
        return out

    def append_events(self, req: EventsIn, idempotency_key: str | None = None) -> EventsOut:
        """Durably append events (before returning), then drop the user's cached record.

        With an idempotency key (the body's, or `idempotency_key` from a header) a retry appends nothing
        and gets the first answer."""
        key = req.idempotency_key or idempotency_key
        if req.idempotency_key and idempotency_key and req.idempotency_key != idempotency_key:
            raise FieldError("idempotency_key", "differs from the Idempotency-Key header; send one of them")
        events = sorted(self._events(req.events, "events"), key=lambda e: e.ts)
        if key is None:
            count = self.store.append_events(req.user, events)
            out = EventsOut(user=req.user, appended=len(events), realtime_events=count)
        else:
            digest = hashlib.sha256(repr([(e.item, e.ts, e.action) for e in req.events]).encode()).hexdigest()
            try:
                done = self.store.append_events_once(req.user, events, key, digest)
            except IdempotencyConflict as exc:
                raise FieldError("idempotency_key", str(exc)) from None
            out = EventsOut(user=req.user, appended=done.appended, realtime_events=done.realtime_events)
        self._invalidate(req.user)
        return out

    def roll_history(self, req: RollIn) -> RollOut:
        """Fold the user's real-time events into the static history (new version: old KV cache is void).

        With no real-time events there is nothing to fold: same version, the cached record stays.
        """
        try:
            roll = self.store.roll_history(req.user)
        except KeyError:
            raise FieldError("user", f"unknown user {req.user!r}", status=404) from None
        if roll.folded:
            self._invalidate(req.user)
            if self.on_roll is not None:
                self.on_roll(req.user, roll.history_version)
        return RollOut(user=req.user, history_version=roll.history_version, folded=roll.folded)

    def _invalidate(self, user: str) -> None:
        with self._epoch_lock:
            self._epochs[user] += 1
            self.cache.invalidate_user(user)

    def unready(self) -> str | None:
        """Why the service cannot answer now (engine unhealthy, store unreachable), or None; blocking."""
        problem = self.engine.health()
        if problem is not None:
            return problem
        try:
            self.store.count_users()
        except Exception as exc:  # a store that cannot answer makes us unready, not broken
            return f"store unavailable: {exc}"
        if health_of(self.cache)["degraded"]:  # a cache outage never makes us unready; try whether it is over
            self.cache.ping()  # type: ignore[attr-defined] (caches that can degrade: resilient.ResilientCache)
        return None

    def list_users(self, query: UsersQuery) -> UsersOut:
        """A page of known user ids (in creation order) and how many users there are."""
        return UsersOut(users=self.store.list_users(query.limit, query.offset), total=self.store.count_users())

    def get_user(self, user: str, recent: int = 20) -> UserOut:
        """Profile, history version and recent events (with titles) of a known user."""
        if not USER_ID_RE.fullmatch(user):
            raise FieldError("user", "user id must be 1-128 letters, digits or _ . : @ -")
        record = self.store.get_user(user)
        if record is None:
            raise FieldError("user", f"unknown user {user!r}", status=404)
        fields = PROFILE_FIELDS[:self.num_profile]
        record.profile = (list(record.profile) + [0] * self.num_profile)[:self.num_profile]
        events = (record.static + record.realtime)[-recent:][::-1]
        return UserOut(user=user, profile=dict(zip(fields, record.profile)), history_version=record.history_version,
                       static_events=len(record.static), realtime_events=len(record.realtime),
                       recent=[EventOut(item=self.to_raw(e.item), ts=e.ts, action=e.action,
                                        title=self.catalog.titles[e.item]) for e in events])
