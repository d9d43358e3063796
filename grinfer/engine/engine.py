"""The transport-free `Engine` facade: a background thread steps an EngineCore; callers await futures."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future

from grinfer.config import EngineConfig
from grinfer.data.types import ItemCatalog
from grinfer.engine.core import EngineCore
from grinfer.engine.request import EngineError, Overloaded, RankRequest, RankResult
from grinfer.engine.scheduler import RequestState
from grinfer.model.mtgr import MTGR

log = logging.getLogger("grinfer.engine")


class Engine:
    """Thread-safe front of the engine: `await engine.rank(req)` or `engine.rank_sync(req)`."""

    def __init__(self, model: MTGR, catalog: ItemCatalog, config: EngineConfig = EngineConfig(),
                 on_step: Callable[[dict], None] | None = None):
        self.core = EngineCore(model, catalog, config)
        self.on_step = on_step  # called (outside the lock) with each computing step's stats
        self._futures: dict[int, Future] = {}  # keyed by id(RequestState): callers' request ids may repeat
        # submit() only appends here under the lock; the loop thread admits and steps without holding it,
        # so callers (an event loop) never wait for a step to finish
        self._inbox: list[tuple[RequestState, Future]] = []
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> Engine:
        """Start the stepping thread (idempotent)."""
        with self._lock:
            if self._thread is None:
                self._stopping = False
                self._thread = threading.Thread(target=self._loop, name="grinfer-engine", daemon=True)
                self._thread.start()
        return self

    def shutdown(self, drain: bool = True) -> None:
        """Stop the thread; with drain, admitted requests finish first, else they fail."""
        with self._lock:
            self._stopping = True
            self._drain = drain
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ---- requests ---------------------------------------------------------------------------
    def submit(self, request: RankRequest) -> Future:
        """Queue a request; the future resolves to a RankResult or raises an EngineError."""
        future: Future = Future()
        state = self.core.prepare(request)  # bad requests fail here, synchronously
        with self._lock:
            if not self.running:
                raise EngineError("engine is not running")
            limit = self.core.config.max_queue
            if len(self.core.scheduler.waiting) + len(self._inbox) >= limit:
                raise Overloaded(f"engine queue is full ({limit} waiting); retry later")
            self._inbox.append((state, future))
            self._wake.notify()
        return future

    async def rank(self, request: RankRequest) -> RankResult:
        """Score a request (awaitable; safe from many tasks at once)."""
        return await asyncio.wrap_future(self.submit(request))

    def rank_sync(self, request: RankRequest, timeout: float | None = None) -> RankResult:
        """Blocking twin of `rank`."""
        return self.submit(request).result(timeout)

    @property
    def running(self) -> bool:
        """Whether the stepping thread is alive and accepting requests."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def stats(self) -> dict:
        """The core's plain stats (read without stopping the loop: numbers may be one step apart)."""
        return self.core.stats()

    # ---- loop -------------------------------------------------------------------------------
    def _admit(self) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
        for state, future in inbox:
            try:
                self.core.add(state)
            except EngineError as exc:
                if future.set_running_or_notify_cancel():
                    future.set_exception(exc)
                continue
            self._futures[id(state)] = future

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._inbox and not self.core.has_work() and not self._stopping:
                    self._wake.wait()
                stop = self._stopping and (not self._drain or not (self._inbox or self.core.has_work()))
            if stop:
                break
            self._admit()
            steps = self.core.steps
            finished = self.core.step()
            step_stats = self.core.last_step if self.core.steps != steps else None
            resolved = [(self._futures.pop(id(s), None), r) for s, r in finished]
            if step_stats is not None and self.on_step is not None:
                try:
                    self.on_step(step_stats)
                except Exception:  # a broken observer must not lose requests
                    log.exception("on_step hook failed")
            for future, result in resolved:
                if future is None or not future.set_running_or_notify_cancel():
                    continue  # the caller gave up (its task was cancelled): drop the result
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
        with self._lock:
            pending = list(self._futures.values()) + [f for _, f in self._inbox]
            self._futures, self._inbox = {}, []
        for future in pending:
            if future.set_running_or_notify_cancel():
                future.set_exception(EngineError("engine shut down before the request ran"))
