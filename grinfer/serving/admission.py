"""Admission at the door: refuse a request before any work when the server is past what it can serve.

Little's law: requests in flight = service rate x latency. To keep the admitted requests' latency near
a target, admit while the requests in flight stay under `rate x target`, where the rate is measured
(completions per second, smoothed); a request with a deadline shorter than the target uses its own.
Refused requests cost nothing (no store read, no retrieval, no engine queue), so past saturation the
server's goodput stays near its peak and a 429 answers in microseconds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from grinfer.engine.request import Overloaded


class Admission:
    """Counts requests in flight and admits them up to the bound the measured service rate allows."""

    def __init__(self, target_s: float | None = 0.5, floor: int = 64, ceiling: int = 4096, window_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        self.target_s, self.floor, self.ceiling, self.window_s, self.clock = target_s, floor, ceiling, window_s, clock
        self.in_flight = 0
        self.rate = 0.0  # completions per second, smoothed over windows of `window_s`
        self.refused = 0
        self._done_in_window = 0
        self._window_start = clock()
        self._lock = threading.Lock()

    def bound(self, deadline_s: float | None = None) -> int | None:
        """Requests that may be in flight for a request whose latency budget is `deadline_s` (or the target);
        None: no bound (no target set). Until a rate is measured, `floor` requests may be in flight."""
        if self.target_s is None:
            return None
        budget = self.target_s if deadline_s is None else min(self.target_s, deadline_s)
        return max(self.floor, min(self.ceiling, int(self.rate * budget)))

    @contextmanager
    def admit(self, deadline_ms: int | None = None) -> Iterator[None]:
        """Hold a place for one request, or raise Overloaded at once when the server is past its bound."""
        with self._lock:
            self._roll()
            limit = self.bound(deadline_ms / 1e3 if deadline_ms else None)
            if limit is not None and self.in_flight >= limit:
                self.refused += 1
                raise Overloaded(f"server is saturated ({self.in_flight} requests in flight, about "
                                 f"{self.rate:.0f} served a second); retry later")
            self.in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self.in_flight -= 1
                self._done_in_window += 1
                self._roll()

    def _roll(self) -> None:
        """Close the rate window when it is over (exponential smoothing across windows)."""
        now = self.clock()
        elapsed = now - self._window_start
        if elapsed < self.window_s:
            return
        measured = self._done_in_window / elapsed
        self.rate = measured if self.rate == 0.0 else 0.5 * self.rate + 0.5 * measured
        self._done_in_window, self._window_start = 0, now
