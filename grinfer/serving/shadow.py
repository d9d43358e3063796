"""Shadow scoring: a candidate version scores a sampled fraction of production's answered requests in the
background, and its ranking is compared with production's.

The copy is submitted after production has answered, so it is never on a response's path; it is dropped
(and counted) while the server is busy or `max_pending` copies are still out, so under load it is the
first thing to give way. Per comparison: Spearman's rank correlation of the two versions' fused scores over
the request's candidates, and the mean and largest absolute score difference.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from concurrent.futures import Future

import torch

from grinfer.engine import RankRequest
from grinfer.recommend import fused_score

MAX_PENDING = 4


def spearman(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Spearman's rank correlation of two score vectors (None for fewer than two candidates or a constant one)."""
    if a.numel() < 2:
        return None
    ra = torch.argsort(torch.argsort(a)).double()
    rb = torch.argsort(torch.argsort(b)).double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denominator if denominator else None


class ShadowScorer:
    """Compares a shadow version's scores with production's on sampled requests (see the module docstring)."""

    def __init__(self, fraction: float, weights: torch.Tensor | None = None, max_pending: int = MAX_PENDING,
                 seed: int | None = None):
        self.fraction, self.weights, self.max_pending = fraction, weights, max_pending
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._pending = 0
        self.compared = self.dropped = self.failed = 0
        self.correlation_sum, self.correlations = 0.0, 0
        self.abs_delta_sum, self.max_abs_delta, self.deltas = 0.0, 0.0, 0

    def offer(self, request: RankRequest, production: torch.Tensor, submit, busy: bool) -> Future | None:
        """Maybe score a copy of `request` with `submit` (the shadow engine's) and compare it with the
        `production` probabilities; the future resolves once the comparison is recorded (None: not sampled,
        or dropped)."""
        if not self.fraction or self._rng.random() >= self.fraction:
            return None
        with self._lock:
            if busy or self._pending >= self.max_pending:
                self.dropped += 1
                return None
            self._pending += 1
        copy = dataclasses.replace(request, arrival=time.monotonic(), deadline=None, arm=None)
        try:
            future = submit(copy)
        except Exception:  # a full or stopping shadow engine
            with self._lock:
                self._pending, self.dropped = self._pending - 1, self.dropped + 1
            return None
        done: Future = Future()
        future.add_done_callback(lambda f: self._compare(production, f, done))
        return done

    def _compare(self, production: torch.Tensor, future: Future, done: Future) -> None:
        try:
            if future.exception() is not None:
                with self._lock:
                    self.failed += 1
                return
            weights = self.weights if self.weights is not None else torch.ones(production.shape[1])
            ours, theirs = fused_score(production, weights), fused_score(future.result().probabilities, weights)
            rho, delta = spearman(ours, theirs), (ours - theirs).abs()
            with self._lock:
                self.compared += 1
                if rho is not None:
                    self.correlation_sum, self.correlations = self.correlation_sum + rho, self.correlations + 1
                if delta.numel():
                    self.abs_delta_sum += float(delta.sum())
                    self.deltas += delta.numel()
                    self.max_abs_delta = max(self.max_abs_delta, float(delta.max()))
        finally:
            with self._lock:
                self._pending -= 1
            done.set_result(None)

    def stats(self) -> dict:
        """compared, dropped, failed, mean rank correlation, mean and max absolute score delta."""
        with self._lock:
            return {"compared": self.compared, "dropped": self.dropped, "failed": self.failed,
                    "fraction": self.fraction,
                    "rank_correlation": self.correlation_sum / self.correlations if self.correlations else None,
                    "mean_abs_delta": self.abs_delta_sum / self.deltas if self.deltas else None,
                    "max_abs_delta": self.max_abs_delta}
