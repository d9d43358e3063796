"""Continuous batching under a token budget (vLLM's shape: schedule -> execute -> update).

Each step takes, in arrival order, what fits `max_batch_tokens` and `max_batch_requests`: a
request's uncached context tokens first, then its candidates, in micro-batches (M-FALCON) when they
exceed what is left of the budget. A context larger than the whole budget runs alone, a few layers
per step. Requests of one user run one at a time, so a user's cache entry has a single writer.

Progress advances when work is scheduled (vLLM's async scheduling), so the next plan can be made while
the previous step still runs on the device; `update(plan, output)` commits what a finished step
computed. A request leaves the running set only once none of its steps is in flight.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from grinfer.config import EngineConfig
from grinfer.engine.kv_cache import CacheHandle, KVCache
from grinfer.engine.request import DeadlineExceeded, EngineError, Overloaded, RankRequest
from grinfer.engine.signature import CacheLookup, ContextSignature

_keys = iter(range(1 << 62))


@dataclass(eq=False)  # identity: removing one from a queue must not compare their arrays
class RequestState:
    """A request's progress through the engine (its tensors live in the runner, keyed by `key`)."""

    request: RankRequest
    signature: ContextSignature
    lookup: CacheLookup | None = None
    handle: CacheHandle | None = None
    context_scheduled: int = 0  # context tokens handed to steps so far (all layers)
    candidates_scheduled: int = 0
    layer_progress: int = 0  # for a layer-chunked context: layers scheduled for the pending tokens
    context_done: int = 0  # context tokens whose K/V are committed to the cache
    candidates_done: int = 0
    inflight: int = 0  # steps holding this request that have not been updated yet
    error: Exception | None = None  # set when it failed or expired with steps still in flight
    uncached: bool = False  # a failed step moved it to the baseline: its cache entry is not to be trusted
    started: float | None = None
    steps: int = 0
    key: int = field(default_factory=lambda: next(_keys))

    @property
    def context_len(self) -> int:
        return self.signature.num_tokens

    @property
    def num_candidates(self) -> int:
        return len(self.request.candidates)

    @property
    def fully_scheduled(self) -> bool:
        return self.context_scheduled == self.context_len and self.candidates_scheduled == self.num_candidates

    @property
    def finished(self) -> bool:
        return self.context_done == self.context_len and self.candidates_done == self.num_candidates


@dataclass
class WorkItem:
    """One request's share of a step: context positions [ctx_start, ctx_end), candidates [cand_start,
    cand_end), over the pages `blocks` of its cache entry."""

    state: RequestState
    ctx_start: int
    ctx_end: int
    cand_start: int
    cand_end: int
    blocks: list[int] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return self.ctx_end - self.ctx_start + self.cand_end - self.cand_start


@dataclass
class StepPlan:
    """What one step computes; `layers` < all only for a single layer-chunked context."""

    items: list[WorkItem]
    layers: tuple[int, int]
    failed: list[tuple[RequestState, EngineError]] = field(default_factory=list)


class Scheduler:
    """Owns the waiting queue and the running set; asks the KV cache only through its small API."""

    def __init__(self, config: EngineConfig, cache: KVCache, num_layers: int):
        self.config, self.cache, self.num_layers = config, cache, num_layers
        self.waiting: deque[RequestState] = deque()
        self.running: list[RequestState] = []

    def add(self, state: RequestState) -> None:
        """Queue a request; raises Overloaded when the queue is full."""
        if len(self.waiting) >= self.config.max_queue:
            raise Overloaded(f"engine queue is full ({self.config.max_queue} waiting); retry later")
        self.waiting.append(state)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> StepPlan:
        """Pick this step's work; expired requests with nothing in flight come back in `failed`."""
        failed = self._expire(time.monotonic())
        budget, items = self.config.max_batch_tokens, []
        busy_users = {s.request.user for s in self.running}

        for state in list(self.running):
            if state.error is not None or state.fully_scheduled:
                continue
            item = self._take(state, budget, first=not items)
            if item is None:
                break
            if isinstance(item, StepPlan):
                return self._planned(item.items, item.layers, failed)
            items.append(item)
            budget -= item.tokens
            if len(items) >= self.config.max_batch_requests or budget <= 0:
                return self._planned(items, (0, self.num_layers), failed)

        skipped: list[RequestState] = []
        while self.waiting and len(items) < self.config.max_batch_requests and budget > 0:
            state = self.waiting.popleft()
            if state.request.user in busy_users:
                skipped.append(state)
                continue
            if not self._start(state):
                skipped.append(state)
                break  # the pool is full of running users' contexts: wait for them to finish
            busy_users.add(state.request.user)
            item = self._take(state, budget, first=not items)
            if item is None:
                break
            if isinstance(item, StepPlan):
                self.waiting.extendleft(reversed(skipped))
                return self._planned(item.items, item.layers, failed)
            items.append(item)
            budget -= item.tokens
        self.waiting.extendleft(reversed(skipped))
        return self._planned(items, (0, self.num_layers), failed)

    def _expire(self, now: float) -> list[tuple[RequestState, EngineError]]:
        """Expired requests: out of the queues now, or (with steps in flight) marked to finish at update."""
        failed = []
        for queue in (self.running, self.waiting):
            for state in list(queue):
                error = self.expired(state, now)
                if error is None or state.error is not None:
                    continue
                if state.inflight:
                    state.error = error
                else:
                    queue.remove(state)
                    self._unpin(state, ok=True)
                    failed.append((state, error))
        return failed

    def _start(self, state: RequestState) -> bool:
        """Look the request's context up and reserve its pages; False when the pool has no room now."""
        state.lookup, state.handle = self.cache.acquire(state.signature)
        if not self.cache.reserve(state.handle, state.lookup, state.signature):
            self.cache.release(state.handle, keep=state.lookup.cached_tokens > 0)  # no empty entries left
            state.lookup = state.handle = None
            return False
        state.context_scheduled = state.context_done = state.lookup.cached_tokens
        state.started = time.monotonic()
        self.running.append(state)
        return True

    def _planned(self, items: list[WorkItem], layers: tuple[int, int], failed) -> StepPlan:
        """The plan, with each item's progress advanced as scheduled and its pages attached."""
        for item in items:
            state = item.state
            item.blocks = state.handle.blocks if state.handle is not None else []
            state.inflight += 1
            if layers[1] < self.num_layers:
                state.layer_progress = layers[1]
                continue
            state.layer_progress = 0
            state.context_scheduled, state.candidates_scheduled = item.ctx_end, item.cand_end
        return StepPlan(items, layers, failed)

    @staticmethod
    def expired(state: RequestState, now: float) -> DeadlineExceeded | None:
        """The error of a request whose deadline has passed at `now` (monotonic seconds); None while it has time.

        The engine checks before every step (an expired request computes nothing more) and when a
        request finishes (a late answer is an error, its K/V stay cached: they were committed whole).
        """
        deadline = state.request.deadline
        if deadline is None or now <= deadline:
            return None
        return DeadlineExceeded(f"request {state.request.request_id} missed its deadline by "
                                f"{1e3 * (now - deadline):.1f} ms ({state.steps} engine steps done)")

    def _take(self, state: RequestState, budget: int, first: bool) -> WorkItem | StepPlan | None:
        """This request's work within `budget`; a layer-chunk plan if its context needs the whole step."""
        pending = state.context_len - state.context_scheduled
        if pending > self.config.max_batch_tokens or state.layer_progress:
            if not first:
                return None
            per_step = max(1, self.config.max_batch_tokens * self.num_layers // pending)
            start = state.layer_progress
            layers = (start, min(self.num_layers, start + per_step))
            return StepPlan([WorkItem(state, state.context_scheduled, state.context_len, 0, 0)], layers)
        remaining = state.num_candidates - state.candidates_scheduled
        if pending > budget:
            return None
        n = min(remaining, budget - pending)
        if pending == 0 and n == 0 and remaining:
            return None  # no budget left for its candidates this step
        return WorkItem(state, state.context_scheduled, state.context_len, state.candidates_scheduled,
                        state.candidates_scheduled + n)

    def update(self, plan: StepPlan, error: Exception | None = None) -> list[RequestState]:
        """Commit a finished step (or fail its requests with `error`); returns the requests that are now
        done — finished, failed or expired — with nothing left in flight."""
        done = []
        full = plan.layers[1] == self.num_layers
        for item in plan.items:
            state = item.state
            state.inflight -= 1
            state.steps += 1
            if error is not None:
                state.error = state.error or error
            elif full:
                state.context_done = item.ctx_end
                if not state.uncached and state.handle is not None:
                    self.cache.commit(state.handle, item.ctx_end)
                state.candidates_done = item.cand_end
            if state.inflight == 0 and (state.error is not None or state.finished):
                done.append(state)
        for state in done:
            ok = (state.error is None or isinstance(state.error, EngineError)) and not state.uncached
            self.finish(state, ok=ok)
        return done

    def finish(self, state: RequestState, ok: bool = True) -> None:
        """Remove a request from the running set and unpin its cache entry (dropped unless ok)."""
        if state in self.running:
            self.running.remove(state)
        self._unpin(state, ok)

    def _unpin(self, state: RequestState, ok: bool) -> None:
        if state.handle is not None:
            self.cache.release(state.handle, keep=ok)
            state.handle = None
