"""The online cached == uncached check: a sampled fraction of ranked requests is scored again by the whole
uncached model, in the background on the engine's own thread, and compared with what the request got.

The engine's core invariant (DESIGN §6: float32 within 1e-5, bfloat16 within 1e-2; 8-bit K/V within their
own documented tolerance) is tested offline for every backend; this checks it on production traffic. The
largest difference seen is exported as `grinfer_kv_consistency_max_abs_diff`; a check beyond the tolerance
is counted and logged. A check is dropped (and counted) while another one is still pending or the version
is busy: it never delays a request's answer, and under load it gives way first.
"""

from __future__ import annotations

import logging
import random
import threading
from concurrent.futures import Future
from typing import cast

import torch

from grinfer.config import ModelConfig
from grinfer.data.types import ItemCatalog
from grinfer.engine import Engine, RankRequest, RankResult
from grinfer.features.featurizer import FeatureRequest, Featurizer

log = logging.getLogger("grinfer.consistency")
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}  # absolute and relative, on probabilities
# 8-bit K/V (EngineConfig.kv_dtype) against the full-precision uncached model: their documented tolerance
# (tests/quant/test_kv_engine.py), the larger of the two applies
KV_TOLERANCE = {"model": 0.0, "int8": 5e-3, "fp8": 5e-2}


def uncached_probabilities(engine: Engine, featurizer: Featurizer, request: RankRequest) -> torch.Tensor:
    """The request's per-candidate probabilities [K, tasks] from the whole model, no KV cache (call it on the
    engine's thread: `engine.call`)."""
    core = engine.core
    batch = featurizer.rank_batch([FeatureRequest(request.context, request.candidates, request.request_ts)])
    with torch.inference_mode():
        return torch.sigmoid(core.model(batch.to(core.device)).float().cpu())


def exceeds(cached: torch.Tensor, uncached: torch.Tensor, tolerance: float) -> bool:
    """Whether any probability differs by more than tolerance x (1 + |uncached|)."""
    return bool(((cached - uncached).abs() > tolerance * (1 + uncached.abs())).any())


class ConsistencyCheck:
    """Samples one version's ranked requests and recomputes them uncached (see the module docstring)."""

    def __init__(self, engine: Engine, catalog: ItemCatalog, fraction: float, seed: int | None = None):
        self.engine, self.fraction = engine, fraction
        self.featurizer = Featurizer(catalog, cast(ModelConfig, engine.model_config).num_time_buckets)
        self.tolerance = max(TOLERANCE.get(next(engine.core.model.parameters()).dtype, 1e-2),
                             KV_TOLERANCE.get(engine.core.config.kv_dtype, 5e-2))
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._pending = False
        self.checks = self.exceeded = self.dropped = 0
        self.max_abs_diff = 0.0

    def offer(self, request: RankRequest, result: RankResult, busy: bool) -> Future | None:
        """Maybe check this answered request (sampled; dropped while busy or another check is pending); the
        future resolves once the check is recorded, None when none was started."""
        if not self.fraction or self._rng.random() >= self.fraction:
            return None
        with self._lock:
            if busy or self._pending:
                self.dropped += 1
                return None
            self._pending = True
        try:
            future = self.engine.call(lambda: uncached_probabilities(self.engine, self.featurizer, request))
        except Exception:  # a full or stopping engine: no check this time
            with self._lock:
                self._pending, self.dropped = False, self.dropped + 1
            return None
        done: Future = Future()
        future.add_done_callback(lambda f: self._record(request, result.probabilities, f, done))
        return done

    def _record(self, request: RankRequest, cached: torch.Tensor, future: Future, done: Future) -> None:
        try:
            if future.exception() is not None:
                log.warning("consistency check of %s failed: %s", request.user, future.exception())
                return
            uncached = future.result()
            diff = float((cached - uncached).abs().max()) if cached.numel() else 0.0
            with self._lock:
                self.checks += 1
                self.max_abs_diff = max(self.max_abs_diff, diff)
                bad = exceeds(cached, uncached, self.tolerance)
                self.exceeded += bad
            if bad:
                log.error("KV consistency: user %s scored %.3g apart cached and uncached (tolerance %g)",
                          request.user, diff, self.tolerance)
        finally:
            with self._lock:
                self._pending = False
            done.set_result(None)

    def stats(self) -> dict:
        with self._lock:
            return {"checks": self.checks, "exceeded": self.exceeded, "dropped": self.dropped,
                    "max_abs_diff": self.max_abs_diff, "tolerance": self.tolerance, "fraction": self.fraction}
