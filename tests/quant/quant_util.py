"""Helpers of the low-precision tests: engines over the test catalogue, requests, their scores."""

from __future__ import annotations

import numpy as np
import torch

from grinfer.config import EngineConfig
from grinfer.engine import EngineCore, RankRequest
from grinfer.features import FeatureRequest, UserContext

SHAPES = [(9, 3, 5), (0, 2, 3), (5, 0, 4), (12, 4, 1)]  # (S events, R events, candidates) per user


def core(model, catalog, **config) -> EngineCore:
    """An engine with a 4 MiB device pool unless `config` says otherwise."""
    return EngineCore(model, catalog, EngineConfig(**{"kv_cache_bytes": 4 << 20, **config}))


def requests(make_request, prefix: str = "u") -> list[RankRequest]:
    """One cold request per SHAPES entry, users u0, u1, ..."""
    return [as_engine(f"{prefix}{i}", make_request(*shape, seed=i)) for i, shape in enumerate(SHAPES)]


def as_engine(user: str, r: FeatureRequest) -> RankRequest:
    """The feature request as the user's engine request (history version 0)."""
    return RankRequest(user, 0, r.context, r.candidates, r.request_ts)


def extended(req: RankRequest, seed: int, n: int = 2) -> RankRequest:
    """The same user with n new real-time events after its last one."""
    rng = np.random.default_rng(seed)
    ctx = req.context
    last = int(ctx.timestamps[-1]) if len(ctx.items) else req.request_ts
    stamps = last + np.cumsum(rng.integers(1, 600, size=n))
    new = UserContext(ctx.profile, np.r_[ctx.items, rng.integers(1, 41, size=n)].astype(np.int64),
                      np.r_[ctx.timestamps, stamps].astype(np.int64),
                      np.r_[ctx.ratings, rng.integers(1, 6, size=n)].astype(np.int64), ctx.num_static)
    return RankRequest(req.user, 0, new, req.candidates, int(stamps[-1]) + 10)


def scores(engine: EngineCore, reqs: list[RankRequest]) -> dict[str, tuple[str, torch.Tensor]]:
    """Each user's (cache status, probabilities)."""
    for r in reqs:
        engine.add(r)
    out = {}
    for state, result in engine.run_until_done():
        assert not isinstance(result, Exception), result
        out[state.request.user] = (result.cache, result.probabilities)
    return out


def uncached(model, featurizer, req: RankRequest) -> torch.Tensor:
    """The model's probabilities for the request, nothing cached."""
    batch = featurizer.rank_batch([FeatureRequest(req.context, req.candidates, req.request_ts)])
    with torch.no_grad():
        return torch.sigmoid(model(batch))
