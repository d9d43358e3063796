"""Admission at the door: refuse a request before any work when the server is past what it can serve.

Little's law: requests in flight = service rate x latency. To keep the admitted requests' latency under
a budget (the latency target, or a request's shorter deadline), admit while the requests in flight stay
under `rate x budget x headroom`: a request admitted behind that many waits about `headroom` of its
budget, which leaves the rest for the variation around that mean (the p99). The rate is the server's
measured capacity: completions per second over windows of `window_s`, smoothed. A window that refused
nothing and kept the admitted requests' mean latency within `target x headroom` only shows what the
clients asked for (a trickle says nothing of capacity), so it may raise the estimate but never lower
it; a window that refused requests, or whose requests waited longer, measures what the server serves.
Until a window has shown the server saturated (refusals or waits), at least `initial` requests may be
in flight, so a fresh or lightly used server is not refused a burst; after that, at least `floor`.

REST holds its place from the door (the front, before the body is read) to the end of the response, so
the requests in flight include those parsing, validating and encoding on the event loop, where a
saturated CPU server queues them; the service then only checks a shorter deadline (`at_door`). gRPC and
KServe gRPC take their place in the service. Refused requests cost nothing (no body read on REST, no
store read, no retrieval, no engine queue), and a 429 answers in well under a millisecond of server time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar

from grinfer.engine.request import Overloaded

at_door: ContextVar[bool] = ContextVar("grinfer_admitted_at_door", default=False)  # REST: the front holds the place


class Admission:
    """Counts requests in flight and admits them up to the bound the measured service rate allows."""

    def __init__(self, target_s: float | None = 0.5, floor: int = 2, ceiling: int = 4096, window_s: float = 1.0,
                 headroom: float = 0.5, initial: int = 64, clock: Callable[[], float] = time.monotonic):
        self.target_s, self.floor, self.ceiling, self.window_s = target_s, floor, ceiling, window_s
        self.headroom, self.initial, self.clock = headroom, initial, clock
        self.in_flight = 0
        self.rate = 0.0  # the capacity estimate: completions per second, smoothed over windows of `window_s`
        self.refused = 0
        self._done_in_window = 0
        self._latency_in_window = 0.0  # seconds, summed over the window's completions
        self._refused_in_window = 0
        self.saturated_once = False  # a window has refused requests or made them wait
        self._window_start = clock()
        self._lock = threading.Lock()

    def bound(self, deadline_s: float | None = None) -> int | None:
        """Requests that may be in flight for a request whose latency budget is `deadline_s` (or the target);
        None: no bound (no target set). Never below `initial` until the server has been seen saturated."""
        if self.target_s is None:
            return None
        floor = self.floor if self.saturated_once else self.initial
        budget = self.target_s if deadline_s is None else min(self.target_s, deadline_s)
        return max(floor, min(self.ceiling, int(self.rate * budget * self.headroom)))

    def enter(self, deadline_ms: int | None = None) -> float:
        """Take a place for one request (its start time, for `leave`), or raise Overloaded at once when the server
        is past its bound."""
        with self._lock:
            self._roll()
            limit = self.bound(deadline_ms / 1e3 if deadline_ms else None)
            if limit is not None and self.in_flight >= limit:
                raise self._refusal()
            self.in_flight += 1
        return self.clock()

    def leave(self, start: float) -> None:
        """Give back the place `enter` took at `start`."""
        with self._lock:
            self.in_flight -= 1
            self._done_in_window += 1
            self._latency_in_window += self.clock() - start
            self._roll()

    @contextmanager
    def admit(self, deadline_ms: int | None = None) -> Iterator[None]:
        """Hold a place for one request, or raise Overloaded at once when the server is past its bound."""
        start = self.enter(deadline_ms)
        try:
            yield
        finally:
            self.leave(start)

    def admit_here(self, deadline_ms: int | None = None):
        """The service's admission: a place of its own, or (REST, whose front holds one) only the check that a
        request with a shorter deadline than the target is not behind more than its own bound."""
        if not at_door.get():
            return self.admit(deadline_ms)
        limit = self.bound(deadline_ms / 1e3) if deadline_ms else None
        if limit is not None and self.in_flight > limit:  # in_flight counts this request already
            with self._lock:
                raise self._refusal()
        return nullcontext()

    def _refusal(self) -> Overloaded:
        """Count one refusal (the lock held) and return the error to raise."""
        self.refused += 1
        self._refused_in_window += 1
        return Overloaded(f"server is saturated ({self.in_flight} requests in flight, about {self.rate:.0f} "
                          f"served a second); retry later")

    def _roll(self) -> None:
        """Close the rate window when it is over (exponential smoothing across windows)."""
        now = self.clock()
        elapsed = now - self._window_start
        if elapsed < self.window_s:
            return
        done, refused = self._done_in_window, self._refused_in_window
        if done or refused:  # an idle window measures nothing
            measured = done / elapsed
            waited = done and self._latency_in_window / done > (self.target_s or 0.0) * self.headroom
            self.saturated_once = self.saturated_once or bool(refused or waited)
            if self.rate == 0.0:
                self.rate = measured
            elif refused or waited or measured > self.rate:  # a trickle cannot lower the estimate
                self.rate = 0.5 * self.rate + 0.5 * measured
        self._done_in_window, self._latency_in_window, self._refused_in_window = 0, 0.0, 0
        self._window_start = now
