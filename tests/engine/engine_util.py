"""Helpers for the engine tests: engine requests from feature requests, the uncached reference, runs.

The reference for every engine result is the plain model on the same request, uncached:
`sigmoid(model(featurizer.rank_batch([request])))` (DESIGN §6: float32 within 1e-5).
"""

from __future__ import annotations

import numpy as np
import torch
from model_util import seeded_model

from grinfer.config import EngineConfig, ModelConfig
from grinfer.data.types import ItemCatalog
from grinfer.engine import EngineCore, RankRequest, RankResult
from grinfer.engine.kv_pool import KVPool
from grinfer.engine.scheduler import StepPlan
from grinfer.features import FeatureRequest, Featurizer, UserContext
from grinfer.model.mtgr import MTGR

ATOL = 1e-5
NUM_PROFILE_TOKENS = 4  # len(PROFILE_CARDINALITIES) of tests/conftest.py: one U token per profile field
NUM_ITEMS = 40  # the test catalogue's size (tests/conftest.py)


def uncached(model: MTGR, featurizer: Featurizer, request: FeatureRequest | RankRequest) -> torch.Tensor:
    """Per-candidate task probabilities of the full model on the request, nothing cached."""
    if isinstance(request, RankRequest):
        request = as_feature_request(request)
    with torch.no_grad():
        return torch.sigmoid(model(featurizer.rank_batch([request])))


def as_feature_request(request: RankRequest) -> FeatureRequest:
    return FeatureRequest(request.context, request.candidates, request.request_ts)


def engine_request(user: str, request: FeatureRequest, version: int = 0, **kw) -> RankRequest:
    return RankRequest(user, version, request.context, request.candidates, request.request_ts, **kw)


def context_tokens(request: RankRequest | FeatureRequest) -> int:
    """U + S + R tokens of the request's context."""
    return NUM_PROFILE_TOKENS + len(request.context.items)


def with_context(request: RankRequest, context: UserContext, candidates: np.ndarray | None = None,
                 request_ts: int | None = None, version: int | None = None, **kw) -> RankRequest:
    """The same user (and history version unless given) with another context, optionally other candidates."""
    cands = request.candidates if candidates is None else np.asarray(candidates, np.int64)
    if request_ts is None:
        last = int(context.timestamps[-1]) if len(context.items) else 0
        request_ts = max(request.request_ts, last + 100)
    version = request.history_version if version is None else version
    return RankRequest(request.user, version, context, cands, request_ts, **kw)


def append_events(context: UserContext, rng: np.random.Generator, n: int) -> UserContext:
    """The context with n new real-time events after its last one (random items, ratings and gaps)."""
    last = int(context.timestamps[-1]) if len(context.items) else 956_700_000
    stamps = last + np.cumsum(rng.choice([0, 1, 30, 3600], size=n))
    return UserContext(context.profile, np.r_[context.items, rng.integers(1, NUM_ITEMS + 1, size=n)].astype(np.int64),
                       np.r_[context.timestamps, stamps].astype(np.int64),
                       np.r_[context.ratings, rng.integers(1, 6, size=n)].astype(np.int64), context.num_static)


def truncate_realtime(context: UserContext, keep: int) -> UserContext:
    """The context with only its first `keep` real-time events."""
    end = context.num_static + keep
    return UserContext(context.profile, context.items[:end], context.timestamps[:end], context.ratings[:end],
                       context.num_static)


def fold_realtime(context: UserContext) -> UserContext:
    """A history roll: every real-time event becomes static history."""
    return UserContext(context.profile, context.items, context.timestamps, context.ratings, len(context.items))


def kv_bytes(model: MTGR, tokens: int) -> int:
    """Device-tier bytes that hold `tokens` context tokens (float32)."""
    cfg = model.cfg
    return tokens * KVPool.bytes_per_token(cfg.num_layers, cfg.num_heads, cfg.head_dim, torch.float32)


CORE_DEFAULTS: dict = {}  # settings every make_core gets unless given (a test module may parametrize them)


def make_core(model: MTGR, catalog: ItemCatalog, **config) -> EngineCore:
    config = {"kv_cache_bytes": 4 << 20, **CORE_DEFAULTS, **config}
    return EngineCore(model, catalog, EngineConfig(**config))


def run(core: EngineCore, requests: list[RankRequest] = ()) -> dict[int, RankResult]:
    """Add the requests, step until idle, return results by request id (any failure fails the test)."""
    for req in requests:
        core.add(req)
    out = {}
    for state, result in run_until_done(core):
        assert isinstance(result, RankResult), f"request {state.request.request_id} failed: {result!r}"
        out[state.request.request_id] = result
    return out


def run_until_done(core: EngineCore, max_steps: int = 2000) -> list:
    """`core.run_until_done()` that fails instead of spinning forever when the engine stops progressing."""
    out = []
    for _ in range(max_steps):
        if not core.has_work():
            return out
        out.extend(core.step())
    raise AssertionError(f"engine still busy after {max_steps} steps: {core.stats()}")


def run_one(core: EngineCore, request: RankRequest) -> RankResult:
    return run(core, [request])[request.request_id]


def assert_scores(model: MTGR, featurizer: Featurizer, request: RankRequest, result: RankResult,
                  atol: float = ATOL) -> None:
    """The engine's probabilities for the request equal the uncached model's, candidate by candidate."""
    expected = uncached(model, featurizer, request)
    assert result.probabilities.shape == expected.shape
    assert result.probabilities.dtype == torch.float32
    torch.testing.assert_close(result.probabilities, expected, atol=atol, rtol=0)


def record_plans(core: EngineCore) -> list[StepPlan]:
    """Make the core's scheduler record every plan it returns (instance attribute, this core only)."""
    plans: list[StepPlan] = []
    schedule = core.scheduler.schedule

    def recording() -> StepPlan:
        plan = schedule()
        plans.append(plan)
        return plan

    core.scheduler.schedule = recording
    return plans


def assert_unpinned(core: EngineCore) -> None:
    """No cache entry is pinned and the block pool is fully accounted for."""
    cache = core.cache.manager
    assert all(e.pins == 0 for e in cache.entries.values()), {k: e.pins for k, e in cache.entries.items()}
    used = [b for e in cache.entries.values() for b in e.blocks]
    assert len(used) == len(set(used)), "a block belongs to two entries"
    assert sorted(used + cache.free) == list(range(cache.num_blocks)), "blocks leaked or double-freed"


def fixed_model(cfg: ModelConfig, seed: int = 0) -> MTGR:
    """A model with seeded weights and randomised relative-bias tables (tests/model_util.py)."""
    return seeded_model(cfg, seed)
