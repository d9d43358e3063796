"""Continuous batching under a token budget (vLLM's shape: schedule -> execute -> update).

Each step takes, in arrival order, what fits `max_batch_tokens` and `max_batch_requests`: a
request's uncached context tokens first, then its candidates, in micro-batches (M-FALCON) when they
exceed what is left of the budget. A context larger than the whole budget runs alone, a few layers
per step. Requests of one user run one at a time, so a user's cache entry has a single writer.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from grinfer.config import EngineConfig
from grinfer.engine.kv_cache import CacheHandle, CacheLookup, ContextSignature, KVCache
from grinfer.engine.request import DeadlineExceeded, EngineError, Overloaded, RankRequest


@dataclass
class RequestState:
    """A request's progress through the engine."""

    request: RankRequest
    signature: ContextSignature
    lookup: CacheLookup | None = None
    handle: CacheHandle | None = None
    context_done: int = 0  # context tokens whose K/V are in the cache (all layers)
    layer_progress: int = 0  # for a layer-chunked context: layers done for the pending tokens
    layer_state: torch.Tensor | None = None  # hidden states of the pending context tokens
    candidates_done: int = 0
    logits: list[torch.Tensor] = field(default_factory=list)
    embedded: tuple | None = None  # (x0, meta) of the full sequence, made by the runner once
    started: float | None = None
    steps: int = 0

    @property
    def context_len(self) -> int:
        return self.signature.num_tokens

    @property
    def num_candidates(self) -> int:
        return len(self.request.candidates)

    @property
    def finished(self) -> bool:
        return self.context_done == self.context_len and self.candidates_done == self.num_candidates


@dataclass
class WorkItem:
    """One request's share of a step: context positions [ctx_start, ctx_end), candidates [cand_start, cand_end)."""

    state: RequestState
    ctx_start: int
    ctx_end: int
    cand_start: int
    cand_end: int

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
        """Pick this step's work; expired requests come back in `failed`."""
        now, failed = time.monotonic(), []
        for queue in (self.running, self.waiting):
            for state in list(queue):
                error = self.expired(state, now)
                if error is not None:
                    queue.remove(state)
                    failed.append((state, error))
        budget, items = self.config.max_batch_tokens, []
        busy_users = {s.request.user for s in self.running}

        for state in list(self.running):
            item = self._take(state, budget, first=not items)
            if item is None:
                break
            if isinstance(item, StepPlan):
                return StepPlan(item.items, item.layers, failed)
            items.append(item)
            budget -= item.tokens
            if len(items) >= self.config.max_batch_requests or budget <= 0:
                return StepPlan(items, (0, self.num_layers), failed)

        skipped: list[RequestState] = []
        while self.waiting and len(items) < self.config.max_batch_requests and budget > 0:
            state = self.waiting.popleft()
            if state.request.user in busy_users:
                skipped.append(state)
                continue
            state.lookup, state.handle = self.cache.acquire(state.signature)
            if not self.cache.reserve(state.handle, state.lookup, state.signature):
                self.cache.release(state.handle, keep=state.lookup.cached_tokens > 0)  # no empty entries left
                state.lookup = state.handle = None
                skipped.append(state)
                break  # the pool is full of running users' contexts: wait for them to finish
            state.context_done = state.lookup.cached_tokens
            state.started = time.monotonic()
            self.running.append(state)
            busy_users.add(state.request.user)
            item = self._take(state, budget, first=not items)
            if item is None:
                break
            if isinstance(item, StepPlan):
                self.waiting.extendleft(reversed(skipped))
                return StepPlan(item.items, item.layers, failed)
            items.append(item)
            budget -= item.tokens
        self.waiting.extendleft(reversed(skipped))
        return StepPlan(items, (0, self.num_layers), failed)

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
        pending = state.context_len - state.context_done
        if pending > self.config.max_batch_tokens or state.layer_progress:
            if not first:
                return None
            per_step = max(1, self.config.max_batch_tokens * self.num_layers // pending)
            start = state.layer_progress
            layers = (start, min(self.num_layers, start + per_step))
            return StepPlan([WorkItem(state, state.context_done, state.context_len, 0, 0)], layers)
        remaining = state.num_candidates - state.candidates_done
        if pending > budget:
            return None
        n = min(remaining, budget - pending)
        if pending == 0 and n == 0 and remaining:
            return None  # no budget left for its candidates this step
        return WorkItem(state, state.context_done, state.context_len, state.candidates_done,
                        state.candidates_done + n)

    def update(self, plan: StepPlan) -> list[RequestState]:
        """Advance progress after a step; returns the requests that are now finished."""
        done = []
        full = plan.layers == (0, self.num_layers)
        for item in plan.items:
            state = item.state
            state.steps += 1
            if not full:
                state.layer_progress = plan.layers[1] % self.num_layers
                if plan.layers[1] < self.num_layers:
                    continue
            state.context_done = item.ctx_end
            self.cache.commit(state.handle, item.ctx_end)
            state.candidates_done = item.cand_end
            if state.finished:
                done.append(state)
        for state in done:
            self.finish(state)
        return done

    def finish(self, state: RequestState, ok: bool = True) -> None:
        """Remove a request from the running set and unpin its cache entry."""
        if state in self.running:
            self.running.remove(state)
        if state.handle is not None:
            self.cache.release(state.handle, keep=ok)
            state.handle = None


def context_signature(request: RankRequest, num_profile_tokens: int) -> ContextSignature:
    """The cache identity of a request's context."""
    ctx = request.context
    n = ctx.num_static
    realtime = np.stack([ctx.items[n:], ctx.timestamps[n:], ctx.ratings[n:]], 1).astype(np.int64)
    return ContextSignature(request.user, request.history_version, num_profile_tokens + n, realtime,
                            tuple(int(v) for v in ctx.profile))
