"""Per-arm request counts and latency (plain numbers the model set keeps and the metrics exporter reads)."""

from __future__ import annotations

import threading
from bisect import bisect_left
from dataclasses import dataclass, field

from grinfer.serving.metrics import LATENCY_BUCKETS


@dataclass
class ArmCounts:
    """One (arm, model version)'s answered and failed requests and a latency histogram (engine time, seconds)."""

    requests: int = 0
    errors: int = 0
    seconds_sum: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))  # the last: +Inf

    def quantile(self, q: float) -> float | None:
        """The upper edge of the bucket holding the q-quantile of the latencies (None before any request)."""
        total = sum(self.buckets)
        if not total:
            return None
        seen = 0
        for edge, count in zip((*LATENCY_BUCKETS, float("inf")), self.buckets):
            seen += count
            if seen >= q * total:
                return edge
        return float("inf")

    def as_dict(self) -> dict:
        return {"requests": self.requests, "errors": self.errors, "seconds_sum": self.seconds_sum,
                "edges": list(LATENCY_BUCKETS), "buckets": list(self.buckets), "p50_s": self.quantile(0.5),
                "p99_s": self.quantile(0.99)}


class ArmStats:
    """Counts keyed by (arm, model version); thread-safe."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str], ArmCounts] = {}
        self._lock = threading.Lock()

    def observe(self, arm: str, model_version: str, seconds: float, ok: bool) -> None:
        """Count one request of the arm (answered when `ok`, else failed) that took `seconds` in the engine."""
        with self._lock:
            counts = self._counts.setdefault((arm, model_version), ArmCounts())
            if ok:
                counts.requests += 1
                counts.seconds_sum += seconds
                counts.buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
            else:
                counts.errors += 1

    def snapshot(self) -> list[dict]:
        """[{"arm", "model_version", "requests", "errors", "seconds_sum", "edges", "buckets", "p50_s", "p99_s"}]
        (`buckets`: counts per latency bucket up to each edge in seconds, then above the last)."""
        with self._lock:
            return [{"arm": arm, "model_version": version, **counts.as_dict()}
                    for (arm, version), counts in sorted(self._counts.items())]
