"""Ragged request batches for checking exports: random users over a random catalogue with the model's
vocabularies, featurized by the real featurizers, at chosen per-user sizes."""

from __future__ import annotations

import numpy as np

from grinfer.config import ModelConfig
from grinfer.data.types import ItemCatalog
from grinfer.features import FeatureRequest, Featurizer, MTGRBatch, RetrievalBatch, UserContext, retrieval_batch

START_TS = 1_000_000_000
GAPS_S = np.array([0, 3, 40, 900, 7_200, 90_000, 2_000_000])  # equal timestamps included


def random_catalog(cfg: ModelConfig, seed: int = 0) -> ItemCatalog:
    """Items 1..num_items with 1-3 genres each and a year bucket below the model's count."""
    rng = np.random.default_rng(seed)
    n = cfg.num_items
    genres = np.zeros((n + 1, cfg.num_genres), np.uint8)
    rows = np.repeat(np.arange(1, n + 1), rng.integers(1, 4, n))
    genres[rows, rng.integers(0, cfg.num_genres, len(rows))] = 1
    years = np.r_[0, rng.integers(1, max(cfg.num_year_buckets, 2), n)].astype(np.int64)
    return ItemCatalog(genres, years, [""] + [f"item {i}" for i in range(1, n + 1)],
                       [f"genre {g}" for g in range(cfg.num_genres)], np.arange(n + 1, dtype=np.int64))


def _events(rng: np.random.Generator, cfg: ModelConfig, n: int) -> tuple[np.ndarray, np.ndarray]:
    items = rng.integers(1, cfg.num_items + 1, n).astype(np.int64)
    return items, (START_TS + np.cumsum(rng.choice(GAPS_S, n))).astype(np.int64)


def ranking_batch(cfg: ModelConfig, catalog: ItemCatalog, sizes: list[tuple[int, int, int]],
                  seed: int = 0) -> MTGRBatch:
    """One featurized ranking batch: a user per (S events, R events, candidates) triple."""
    rng = np.random.default_rng(seed)
    requests = []
    for num_static, num_realtime, num_candidates in sizes:
        items, stamps = _events(rng, cfg, num_static + num_realtime)
        profile = np.array([rng.integers(0, c) for c in cfg.profile_cardinalities], np.int64)
        ctx = UserContext(profile, items, stamps, rng.integers(1, 6, len(items)).astype(np.int64), num_static)
        last = int(stamps[-1]) if len(stamps) else START_TS
        candidates = rng.integers(1, cfg.num_items + 1, num_candidates).astype(np.int64)
        requests.append(FeatureRequest(ctx, candidates, last + int(rng.integers(1, 5_000))))
    return Featurizer(catalog, cfg.num_time_buckets).rank_batch(requests)


def retrieval_sample(cfg: ModelConfig, lengths: list[int], seed: int = 0) -> RetrievalBatch:
    """One retrieval batch of sequences of these (non-zero) lengths."""
    rng = np.random.default_rng(seed)
    return retrieval_batch([_events(rng, cfg, n) for n in lengths], with_targets=False)
