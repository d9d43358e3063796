"""DESIGN §4's reference workloads: shapes, synthetic requests, and FLOPs counted under the MTGR mask."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from grinfer.config import ModelConfig, preset
from grinfer.data.types import ItemCatalog
from grinfer.engine.request import RankRequest
from grinfer.features.featurizer import UserContext

BENCH_ITEMS = 20_000
START_TS = 1_600_000_000


@dataclass(frozen=True)
class Workload:
    """One named benchmark shape: per-request context and candidates, batch size, warm or cold."""

    name: str
    preset: str
    profile_tokens: int
    static: int
    realtime: int
    candidates: int
    batch: int
    new_events: int | None = None  # warm: only this many R events are new; None = cold (nothing cached)
    dtype: str = "bfloat16"

    @property
    def warm(self) -> bool:
        return self.new_events is not None

    def model_config(self) -> ModelConfig:
        """The preset sized for the synthetic benchmark vocabulary."""
        return preset(self.preset).with_vocab(num_items=BENCH_ITEMS,
                                              profile_cardinalities=(16,) * self.profile_tokens)


WORKLOADS = {
    "R1-cold": Workload("R1-cold", "mtgr-large", 16, 1000, 100, 512, 32),
    "R1-warm": Workload("R1-warm", "mtgr-large", 16, 1000, 100, 512, 32, new_events=10),
    "R2": Workload("R2", "mtgr-small", 16, 200, 20, 128, 64, new_events=2),
    "CPU-demo": Workload("CPU-demo", "mtgr-tiny", 4, 60, 20, 100, 8, new_events=2, dtype="float32"),
}


def workload(name: str, **overrides) -> Workload:
    """A named workload with optional shape overrides (None values are ignored)."""
    try:
        base = WORKLOADS[name]
    except KeyError:
        raise ValueError(f"workload: unknown workload {name!r}; choose one of {', '.join(WORKLOADS)}") from None
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


def bench_catalog(num_items: int = BENCH_ITEMS, seed: int = 0) -> ItemCatalog:
    """A random item catalogue for benchmarks (genres, years)."""
    rng = np.random.default_rng(seed)
    genres = (rng.random((num_items + 1, 18)) < 0.12).astype(np.uint8)
    return ItemCatalog(genres=genres, year_bucket=rng.integers(1, 19, num_items + 1),
                       titles=[""] * (num_items + 1), genre_names=[f"g{i}" for i in range(18)],
                       raw_ids=np.arange(num_items + 1))


def make_requests(w: Workload, users: list[str], rng: np.random.Generator, version: int = 0,
                  base_events: dict[str, UserContext] | None = None, num_candidates: int | None = None,
                  realtime: int | None = None) -> list[RankRequest]:
    """One request per user. With `base_events`, each user's context is its base context plus fresh R events."""
    out = []
    k = w.candidates if num_candidates is None else num_candidates
    for user in users:
        if base_events is not None:
            base = base_events[user]
            n_new = w.new_events or 0
            ts = base.timestamps[-1] + np.cumsum(rng.integers(1, 600, n_new))
            ctx = UserContext(base.profile, np.r_[base.items, rng.integers(1, BENCH_ITEMS + 1, n_new)],
                              np.r_[base.timestamps, ts], np.r_[base.ratings, rng.integers(1, 6, n_new)],
                              base.num_static)
        else:
            n = w.static + (w.realtime if realtime is None else realtime)
            ctx = UserContext(rng.integers(1, 16, w.profile_tokens), rng.integers(1, BENCH_ITEMS + 1, n),
                              START_TS + np.cumsum(rng.integers(0, 3600, n)), rng.integers(1, 6, n), w.static)
        cands = rng.choice(BENCH_ITEMS, size=k, replace=False) + 1
        out.append(RankRequest(user, version, ctx, cands, int(ctx.timestamps[-1]) + 60))
    return out


def request_flops(cfg: ModelConfig, profile: int, static: int, realtime: int, candidates: int,
                  computed_realtime: int | None = None, context_cached: bool = False) -> float:
    """Useful FLOPs of one request: layer matmuls of computed tokens + attention under the MTGR mask.

    Counts 2·m·n·k per matmul: uvqk (d -> 4d) and output (d -> d) projections, QKᵀ and A·V over the
    keys each query may see. With `context_cached`, U+S and the first realtime - computed_realtime R
    events are not computed.
    """
    d, layers = cfg.d_model, cfg.num_layers
    ctx_static = profile + static
    new_r = realtime if computed_realtime is None else computed_realtime
    first_r = realtime - new_r
    per_token_linear = 2 * d * 4 * d + 2 * d * d
    # visible keys per query
    static_keys = 0 if context_cached else ctx_static * ctx_static
    r_keys = sum(ctx_static + j + 1 for j in range(first_r, realtime))
    cand_keys = candidates * (ctx_static + realtime + 1)
    computed = (0 if context_cached else ctx_static) + new_r + candidates
    attention = 4 * d * (static_keys + r_keys + cand_keys)
    return float(layers * (computed * per_token_linear + attention))
