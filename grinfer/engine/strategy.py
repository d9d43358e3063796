"""Which backend runs a step, and what happens when one fails: a chain of backends, each behind a
circuit breaker, ending with `baseline` (the uncached model, always healthy).

A step that raises, returns non-finite logits or hangs past `EngineConfig.step_timeout_s` is run again on
the next healthy backend of the chain; each such re-run is counted by (from, to, reason). A backend that
fails `BREAKER_FAILURES` times within `BREAKER_WINDOW_S` is skipped for `BREAKER_COOLDOWN_S`, then given
one step again (half-open): a success closes its breaker, a failure opens it for another cool-down.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field

BREAKER_FAILURES = 3
BREAKER_WINDOW_S = 60.0
BREAKER_COOLDOWN_S = 30.0
BASELINE = "baseline"


class NonFiniteOutput(RuntimeError):
    """A step's logits or hidden states hold NaN or infinity."""


class StepTimeout(RuntimeError):
    """A step did not finish within EngineConfig.step_timeout_s."""


@dataclass
class Breaker:
    """Opens after `failures` failures within `window_s`; half-opens `cooldown_s` later."""

    failures: int = BREAKER_FAILURES
    window_s: float = BREAKER_WINDOW_S
    cooldown_s: float = BREAKER_COOLDOWN_S
    recent: deque = field(default_factory=deque)
    opened_at: float | None = None
    opened: int = 0  # times it opened

    def allows(self, now: float) -> bool:
        """Whether a step may run on this backend now (closed, or half-open after the cool-down)."""
        return self.opened_at is None or now - self.opened_at >= self.cooldown_s

    def success(self) -> None:
        self.recent.clear()
        self.opened_at = None

    def failure(self, now: float) -> None:
        if self.opened_at is not None:  # the half-open trial failed
            self.opened_at = now
            self.opened += 1
            return
        self.recent.append(now)
        while self.recent and now - self.recent[0] > self.window_s:
            self.recent.popleft()
        if len(self.recent) >= self.failures:
            self.opened_at, self.opened = now, self.opened + 1
            self.recent.clear()

    @property
    def healthy(self) -> bool:
        return self.opened_at is None


class BackendChain:
    """Backend names in fallback order (the last is always baseline) with a breaker each."""

    def __init__(self, names: list[str], clock=time.monotonic):
        if not names or names[-1] != BASELINE:
            names = [*names, BASELINE]
        self.names, self.clock = names, clock
        self.breakers = {name: Breaker() for name in names}
        self.fallbacks: Counter[tuple[str, str, str]] = Counter()

    def first(self, start: int = 0) -> int:
        """The index of the first backend at or after `start` whose breaker allows a step (baseline last)."""
        now = self.clock()
        for i in range(start, len(self.names) - 1):
            if self.breakers[self.names[i]].allows(now):
                return i
        return len(self.names) - 1

    def succeeded(self, index: int) -> None:
        self.breakers[self.names[index]].success()

    def failed(self, index: int, reason: str) -> int:
        """Count a failure of backend `index`; returns the index to re-run the step on."""
        name = self.names[index]
        self.breakers[name].failure(self.clock())
        to = self.first(index + 1) if index + 1 < len(self.names) else index
        self.fallbacks[(name, self.names[to], reason)] += 1
        return to

    def stats(self) -> dict:
        """{"primary", "active": first healthy backend, "backends": [{name, healthy, opened}], "fallbacks": [...]}."""
        return {"primary": self.names[0], "active": self.names[self.first()],
                "backends": [{"backend": n, "healthy": self.breakers[n].healthy, "opened": self.breakers[n].opened}
                             for n in self.names],
                "fallbacks": [{"from": f, "to": t, "reason": r, "count": c} for (f, t, r), c in self.fallbacks.items()]}


def reason_of(exc: BaseException) -> str:
    """The fallback reason label of a step failure."""
    if isinstance(exc, NonFiniteOutput):
        return "non_finite"
    if isinstance(exc, StepTimeout):
        return "timeout"
    return "exception"
