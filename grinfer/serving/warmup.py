"""Warm-up before ready: the request shapes the server expects go through the engine once, so that
compiles (torch.compile, Triton) and CUDA-graph captures happen before `/readyz` says ready, never on a
user's request.

Synthetic users (ids `__warmup-N`) send cold then warm rank requests of the demo's sizes at batch sizes
1 to `max_batch`, and batched retrievals; every shape bucket they leave pending is then captured. Buckets
first seen later are served eagerly and captured when the engine is idle (engine/backends/graphs.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

from grinfer.engine import Engine, RankRequest
from grinfer.engine.probe import synthetic_context

log = logging.getLogger("grinfer.serve")
BATCHES = (1, 4, 16, 64)
CANDIDATES = (100, 200)  # a /rank of the demo's size, and /recommend's default retrieve


def warm_up(engine: Engine, progress: Callable[[float], None] = lambda f: None, max_batch: int = 64,
            candidates: tuple[int, ...] = CANDIDATES, num_static: int = 60, num_realtime: int = 5,
            seed: int = 0) -> dict:
    """Run the expected shapes (cold and warm ranks, retrievals) through the engine, then capture every
    pending CUDA graph. Returns {"requests", "graphs", "seconds"}; `progress` gets the fraction done.

    Contexts with S and R events go at every batch size; contexts without R events and without any
    history (cold-start users: torch.compile specialises on them) at the two smallest."""
    start = time.perf_counter()
    core = engine.core
    num_items, num_profile = engine.retriever.num_items, core.num_profile_tokens
    batches = [b for b in BATCHES if b <= min(max_batch, core.config.max_batch_requests)]
    shapes = [(num_static, num_realtime, batches), (num_static, 0, batches[:2]), (0, 0, batches[:2])]
    rounds = [(s, r, b, c, warm) for s, r, sizes in shapes for b in sizes for c in candidates for warm in (False, True)]
    sent = 0
    for i, (n_static, n_realtime, batch, num_candidates, warm) in enumerate(rounds):
        contexts = [synthetic_context(np.random.default_rng((seed, n_static, n_realtime, batch, num_candidates, u)),
                             num_items, num_profile, n_static, n_realtime) for u in range(batch)]
        futures = [engine.submit_retrieval(ctx, num_candidates) for ctx in contexts] if not warm else []
        for f in futures:
            f.result()
        rng = np.random.default_rng((seed, i))
        requests = [RankRequest(f"__warmup-{n_static}-{n_realtime}-{batch}-{num_candidates}-{u}", 0, ctx,
                                rng.choice(np.arange(1, num_items + 1), min(num_candidates, num_items), replace=False),
                                int(time.time())) for u, ctx in enumerate(contexts)]
        for f in [engine.submit(r) for r in requests]:
            f.result()
        sent += len(requests) + len(futures)
        progress(0.8 * (i + 1) / len(rounds))
    backend = core.runner.backend
    pending = backend.stats().get("pending", 0)
    for j in range(pending):
        engine.call(backend.capture_pending).result()
        progress(0.8 + 0.2 * (j + 1) / pending)
    engine.call(core.cache.reset_stats).result()  # count real traffic only
    graphs = backend.stats().get("graphs", 0)
    seconds = time.perf_counter() - start
    log.info("warm-up: %d requests, %d CUDA graphs, %.1f s", sent, graphs, seconds)
    progress(1.0)
    return {"requests": sent, "graphs": graphs, "seconds": seconds}
