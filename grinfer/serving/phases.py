"""Where one request's time goes outside (and inside) the engine, phase by phase.

The REST front starts a `Phases` when a request arrives; the route and the service `mark` the end of
each phase (`read` body received, `parse` JSON + validation, `user` store/cache read, `features` ids and
context, `retrieve`, `engine` queue + compute, `respond` ranking the output, `encode` JSON); the front
closes it with `send` once the response went out and the metrics observe each phase.
"""

from __future__ import annotations

import time
from collections.abc import MutableMapping
from typing import Any


class Phases:
    """Consecutive named spans of one request: `mark(name)` ends the span that started at the previous mark."""

    __slots__ = ("last", "spans")

    def __init__(self, start: float | None = None):
        self.last = time.perf_counter() if start is None else start
        self.spans: list[tuple[str, float]] = []

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.spans.append((name, now - self.last))
        self.last = now


def phases_of(scope: MutableMapping[str, Any]) -> Phases:
    """The request's Phases (a detached one when the front did not start any, e.g. in-process callers)."""
    phases = scope.get("state", {}).get("phases")
    return phases if phases is not None else Phases()
