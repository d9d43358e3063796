"""Retrieval on the engine's thread, batched: the same top-n as `retrieve_candidates` one user at a time."""

from __future__ import annotations

import numpy as np
import torch

from grinfer.config import preset
from grinfer.engine.retrieval import BatchRetriever
from grinfer.features.featurizer import UserContext
from grinfer.model import build_model
from grinfer.recommend import retrieve_candidates

NUM_ITEMS = 60


def context(rng: np.random.Generator, n: int) -> UserContext:
    stamps = 956_700_000 + np.cumsum(rng.integers(0, 4000, size=n))
    return UserContext(np.zeros(4, np.int64), rng.integers(1, NUM_ITEMS + 1, size=n).astype(np.int64),
                       stamps.astype(np.int64), rng.integers(1, 6, size=n).astype(np.int64), n)


def test_batched_top_n_equals_one_user_at_a_time():
    torch.manual_seed(0)
    cfg = preset("hstu-ml1m").with_vocab(num_items=NUM_ITEMS).replace(dropout=0.0, max_seq_len=16)
    model = build_model(cfg).eval()
    rng = np.random.default_rng(1)
    # ragged histories (one longer than the model's window, one empty) and different n, one above the unseen count
    queries = [(context(rng, n), k) for n, k in [(5, 10), (40, 7), (0, 5), (12, 200), (1, 1)]]
    got = BatchRetriever(model, NUM_ITEMS, torch.device("cpu")).top_n(queries)
    for (ctx, k), items in zip(queries, got):
        want = retrieve_candidates(model, ctx, k, NUM_ITEMS)
        np.testing.assert_array_equal(items, want)
        assert not set(items.tolist()) & set(ctx.items.tolist()) and 0 not in items.tolist()
    assert len(got[3]) == NUM_ITEMS - len(np.unique(queries[3][0].items))


def test_without_a_model_every_unseen_item_is_a_candidate():
    rng = np.random.default_rng(2)
    ctx = context(rng, 8)
    (items,) = BatchRetriever(None, NUM_ITEMS, torch.device("cpu")).top_n([(ctx, 5)])
    np.testing.assert_array_equal(items, np.setdiff1d(np.arange(1, NUM_ITEMS + 1), ctx.items))
