"""The transport-free `Engine` facade: a background thread steps an EngineCore; callers await futures.

The thread is the device's one owner: ranking steps, batched retrievals, CUDA-graph captures and any
other device work a caller hands it (`call`) all run there, never beside it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

from grinfer.config import EngineConfig
from grinfer.data.types import ItemCatalog
from grinfer.embedding.service import embedding_stats
from grinfer.engine.core import EngineCore
from grinfer.engine.request import EngineError, Overloaded, RankRequest, RankResult
from grinfer.engine.retrieval import BatchRetriever, RetrievalQuery
from grinfer.engine.scheduler import RequestState
from grinfer.features.featurizer import UserContext
from grinfer.model.hstu import HSTURetrieval
from grinfer.model.mtgr import MTGR
from grinfer.model.quantize_dense import quantize_dense

log = logging.getLogger("grinfer.engine")
BUSY_CAPTURE_MIN_STEPS = 3  # a bucket captured under load must have been needed by this many steps
UNHEALTHY_AFTER = 3  # consecutive failed device turns (steps or retrieval batches) that make the engine unready


class Engine:
    """Thread-safe front of the engine: `await engine.rank(req)` or `engine.rank_sync(req)`."""

    def __init__(self, model: MTGR, catalog: ItemCatalog, config: EngineConfig = EngineConfig(),
                 on_step: Callable[[dict], None] | None = None, retriever: HSTURetrieval | None = None):
        self.core = EngineCore(model, catalog, config)
        self.retriever = BatchRetriever(retriever, catalog.num_items, self.core.device, config.retrieval_cache_bytes,
                                        config.block_size)
        if self.retriever.model is not None:  # the retrieval HSTU's projections in the same low precision
            assert config.dense is not None  # EngineConfig refuses an unresolved dense mode
            quantize_dense(self.retriever.model, config.dense)
        self.on_step = on_step  # called (outside the lock) with each computing step's stats
        self._futures: dict[int, Future] = {}  # keyed by id(RequestState): callers' request ids may repeat
        # submit() only appends here under the lock; the loop thread admits and steps without holding it,
        # so callers (an event loop) never wait for a step to finish
        self._inbox: list[tuple[RequestState, Future]] = []
        self._retrievals: list[tuple[RetrievalQuery, Future]] = []
        self._calls: list[tuple[Callable[[], object], Future]] = []
        self._idle_work = False  # whether the backend may have deferred work (captures) to do when idle
        self._last_capture = time.monotonic()  # when deferred work last ran (busy captures are rate-limited)
        self._failures_in_row = 0
        self._last_failure = ""
        self.failures = 0  # failed device turns so far
        self.probes: list[dict] = []  # `--backend auto`'s probe table (engine/probe.py), when it chose
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

    def submit_retrieval(self, context: UserContext, n: int, user: str | None = None, version: int = 0) -> Future:
        """Queue a retrieval; the future resolves to the top-n unseen items (model ids, best first). With a
        user, their history K/V are cached per history `version` and reused by their next retrieval."""
        return self._queue("_retrievals", (RetrievalQuery(context, n, user, version),))

    async def retrieve(self, context: UserContext, n: int, user: str | None = None, version: int = 0):
        """Top-n unseen items for the context, computed on the engine's thread with the turn's other retrievals."""
        return await asyncio.wrap_future(self.submit_retrieval(context, n, user, version))

    def call(self, fn: Callable[[], object]) -> Future:
        """Run `fn()` on the engine's thread between steps (device work that must not race a step)."""
        return self._queue("_calls", (fn,))

    def _queue(self, name: str, item: tuple) -> Future:
        """Append (*item, future) to the queue attribute `name`, looked up under the lock: the loop swaps
        the queue lists out, so a list fetched before the lock may already be the loop's (the item lost)."""
        future: Future = Future()
        with self._lock:
            queue = getattr(self, name)
            if not self.running:
                raise EngineError("engine is not running")
            if len(queue) >= self.core.config.max_queue:
                raise Overloaded(f"engine queue is full ({len(queue)} waiting); retry later")
            queue.append((*item, future))
            self._wake.notify()
        return future

    def forget_user(self, user: str, before_version: int) -> Future:
        """Free the user's cached K/V of history versions before `before_version`, on the engine's thread
        (a history roll made through another replica): the ranking contexts' and the retrieval histories';
        the future resolves to whether a ranking context's device entry went."""
        def forget() -> bool:
            self.retriever.forget(user, before_version)
            return self.core.cache.drop_stale(user, before_version)

        return self.call(forget)

    async def rank(self, request: RankRequest) -> RankResult:
        """Score a request (awaitable; safe from many tasks at once)."""
        return await asyncio.wrap_future(self.submit(request))

    def rank_sync(self, request: RankRequest, timeout: float | None = None) -> RankResult:
        """Blocking twin of `rank`."""
        return self.submit(request).result(timeout)

    @property
    def model_config(self):
        """The ranking model's ModelConfig (tasks, profile fields, ...)."""
        return self.core.model.cfg

    @property
    def device(self):
        """The torch.device the engine computes on."""
        return self.core.device

    @property
    def has_retriever(self) -> bool:
        """Whether retrievals use a model (else every unseen item is a candidate)."""
        return self.retriever.model is not None

    @property
    def running(self) -> bool:
        """Whether the stepping thread is alive and accepting requests."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def health(self) -> str | None:
        """None when the engine serves; else why not (stopped, or failing turn after turn)."""
        if not self.running:
            return "engine is not running"
        if self._failures_in_row >= UNHEALTHY_AFTER:
            return f"engine failing: {self._failures_in_row} device turns in a row failed; last: {self._last_failure}"
        return None

    def stats(self) -> dict:
        """The core's plain stats (read without stopping the loop: numbers may be one step apart)."""
        return {**self.core.stats(), "failures": self.failures, "backend": self.core.runner.backend.stats(),
                "probes": self.probes, "retrieval_cache": self.retriever.stats(),
                "device": str(self.core.device), "device_bytes": self.core.device_bytes(),
                "embeddings": embedding_stats(self.core.model)}

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
                while not self._has_work() and not self._stopping and not self._idle_work:
                    self._wake.wait()
                if self._idle_work and not self._has_work() and not self._stopping:
                    self._wake.wait(self.core.config.capture_idle_s)  # deferred work waits for a lull
                busy = self._has_work()
                stop = self._stopping and (not self._drain or not busy)
            if stop:
                self._close_core()
                break
            if not busy:  # idle: deferred device work (a CUDA-graph capture), one piece at a time
                self._idle_work = self._capture_pending()
                continue
            self._run_calls()
            self._run_retrievals()
            self._admit()
            if self.core.has_work():
                self._step()
                self._idle_work = True
                self._capture_while_busy()
        with self._lock:
            pending = (list(self._futures.values()) + [f for _, f in self._inbox]
                       + [item[-1] for item in self._retrievals + self._calls])
            self._futures, self._inbox, self._retrievals, self._calls = {}, [], [], []
        for future in pending:
            if future.set_running_or_notify_cancel():
                future.set_exception(EngineError("engine shut down before the request ran"))

    def _close_core(self) -> None:
        try:
            self.core.close()  # the runner's worker stops; cached K/V go down to the tiers
        except Exception:
            log.exception("closing the engine core failed")

    def _has_work(self) -> bool:
        return bool(self._inbox or self._retrievals or self._calls) or self.core.has_work()

    def _capture_while_busy(self) -> None:
        """Under load without lulls, a bucket that steps keep needing is captured between steps, at most
        once per EngineConfig.capture_busy_s."""
        interval = self.core.config.capture_busy_s
        if interval and time.monotonic() - self._last_capture >= interval:
            self._capture_pending(min_steps=BUSY_CAPTURE_MIN_STEPS)

    def _capture_pending(self, min_steps: int = 1) -> bool:
        self._last_capture = time.monotonic()
        try:
            return self.core.runner.backend.capture_pending(min_steps)
        except Exception:  # the backend contains capture failures; anything else must not stop the loop
            log.exception("deferred backend work failed")
            return False

    def _run_calls(self) -> None:
        with self._lock:
            calls, self._calls = self._calls, []
        for fn, future in calls:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except Exception as exc:
                    future.set_exception(exc)

    def _run_retrievals(self) -> None:
        with self._lock:
            queries, self._retrievals = self._retrievals, []
        queries = [q for q in queries if q[1].set_running_or_notify_cancel()]
        if not queries:
            return
        try:
            results = self.retriever.top_n([query for query, _ in queries])
        except Exception as exc:  # a failing batch fails its retrievals, never the engine
            self._turn(exc)
            for *_, future in queries:
                future.set_exception(exc)
            return
        self._turn(None)
        for (*_, future), result in zip(queries, results):
            future.set_result(result)

    def _step(self) -> None:
        steps = self.core.steps
        finished = self.core.step()
        step_stats = self.core.last_step if self.core.steps != steps else None
        failure = next((r for _, r in finished if isinstance(r, Exception) and not isinstance(r, EngineError)), None)
        if step_stats is not None or failure is not None:
            self._turn(failure)
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

    def _turn(self, failure: Exception | None) -> None:
        """Count a device turn: failures in a row make the engine unhealthy, a success heals it."""
        if failure is None:
            self._failures_in_row = 0
            return
        self.failures += 1
        self._failures_in_row += 1
        self._last_failure = f"{type(failure).__name__}: {failure}"
        if self._failures_in_row == UNHEALTHY_AFTER:
            log.error("engine unhealthy: %s", self._last_failure)
