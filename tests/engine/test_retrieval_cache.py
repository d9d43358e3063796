"""Retrieval over cached history K/V (engine/retrieval_cache.py) equals the uncached model: the same top-N,
user embeddings within fp32 1e-5, on random ragged histories that grow between requests, under both time-bias
conventions, small pages and a pool too small for one batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from grinfer.config import EngineConfig, preset
from grinfer.engine import Engine
from grinfer.engine.kv_pool import KVPool
from grinfer.engine.retrieval import BatchRetriever, RetrievalQuery
from grinfer.features.featurizer import UserContext
from grinfer.model import build_model
from grinfer.model.hstu import HSTURetrieval
from grinfer.recommend import retrieve_candidates

NUM_ITEMS, WINDOW, TOP = 60, 16, 12
CPU = torch.device("cpu")


def retrieval_model(time_bias_from: str = "next", seed: int = 0, num_items: int = NUM_ITEMS,
                    **update) -> HSTURetrieval:
    """hstu-ml1m at test size with spread-out random weights (the bias tables too), so scores rarely tie."""
    torch.manual_seed(seed)
    cfg = preset("hstu-ml1m").with_vocab(num_items=num_items).replace(dropout=0.0, max_seq_len=WINDOW,
                                                                      time_bias_from=time_bias_from, **update)
    model = build_model(cfg).eval()
    assert isinstance(model, HSTURetrieval)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def window_bytes(model: HSTURetrieval, block_size: int, windows: int) -> int:
    """A cache budget of `windows` full windows' pages."""
    cfg = model.cfg
    per_token = KVPool.bytes_per_token(cfg.num_layers, cfg.num_heads, cfg.head_qk_dim, torch.float32,
                                       v_head_dim=cfg.head_v_dim)
    return windows * -(-WINDOW // block_size) * block_size * per_token


def events(rng: np.random.Generator, n: int, after: int = 956_700_000) -> tuple[np.ndarray, np.ndarray]:
    """n events (items, non-decreasing timestamps, repeats included) after time `after`."""
    return (rng.integers(1, NUM_ITEMS + 1, size=n).astype(np.int64),
            (after + np.cumsum(rng.integers(0, 5000, size=n))).astype(np.int64))


def context(items: np.ndarray, stamps: np.ndarray) -> UserContext:
    return UserContext(np.zeros(4, np.int64), items, stamps, np.ones(len(items), np.int64), len(items))


def grow(ctx: UserContext, rng: np.random.Generator, n: int) -> UserContext:
    """The context with n more events appended."""
    items, stamps = events(rng, n, int(ctx.timestamps[-1]) if len(ctx.timestamps) else 956_700_000)
    return context(np.concatenate([ctx.items, items]), np.concatenate([ctx.timestamps, stamps]))


def insert_late(ctx: UserContext, rng: np.random.Generator) -> UserContext:
    """The context with a late event sorted in before its last one (halfway between two timestamps)."""
    if len(ctx.items) < 2:
        return grow(ctx, rng, 1)
    p = int(rng.integers(1, len(ctx.items)))
    stamp = (ctx.timestamps[p - 1] + ctx.timestamps[p]) // 2
    item = rng.integers(1, NUM_ITEMS + 1, size=1)
    return context(np.insert(ctx.items, p, item), np.insert(ctx.timestamps, p, stamp))


def assert_same_as_uncached(cached: BatchRetriever, model: HSTURetrieval, queries: list[RetrievalQuery]) -> None:
    """Top-N and user embeddings of the cached retriever against the uncached model."""
    plain = BatchRetriever(model, NUM_ITEMS, CPU)
    want = plain.top_n(queries)
    with_history = [q for q in queries if len(q.context.items)]
    want_emb = plain._user_embeddings(with_history) if with_history else None
    got = cached.top_n(queries)
    for q, items, expected in zip(queries, got, want):
        np.testing.assert_array_equal(items, expected)
        np.testing.assert_array_equal(items, retrieve_candidates(model, q.context, q.n, NUM_ITEMS))
    if want_emb is not None:  # a second lookup: every context is now cached
        torch.testing.assert_close(cached._user_embeddings(with_history), want_emb, atol=1e-5, rtol=0)


@settings(max_examples=12, deadline=None, derandomize=True, database=None)
@given(lengths=st.lists(st.integers(0, 24), min_size=1, max_size=6),
       growth=st.lists(st.lists(st.integers(-1, 5), min_size=6, max_size=6), min_size=2, max_size=3),
       time_bias_from=st.sampled_from(["query", "next"]), block_size=st.sampled_from([1, 3, 8]),
       windows=st.sampled_from([1, 2, 64]), seed=st.integers(0, 2**16))
def test_cached_retrieval_equals_uncached_on_growing_ragged_histories(lengths, growth, time_bias_from, block_size,
                                                                      windows, seed):
    """Histories from empty to past the window, growing by 0-5 events a round or taking a late event before
    their last one (-1); the same user twice in one batch; a pool of one window (every history its own
    batch) up to one that holds everybody."""
    rng = np.random.default_rng(seed)
    model = retrieval_model(time_bias_from, seed % 3)
    cached = BatchRetriever(model, NUM_ITEMS, CPU, window_bytes(model, block_size, windows), block_size)
    contexts = [context(*events(rng, n)) for n in lengths]
    for round_growth in growth:
        queries = [RetrievalQuery(c, TOP, f"user-{u}", 0) for u, c in enumerate(contexts)]
        queries.append(RetrievalQuery(grow(contexts[0], rng, 1), TOP, "user-0", 0))  # a second writer
        assert_same_as_uncached(cached, model, queries)
        contexts = [insert_late(c, rng) if k < 0 else grow(c, rng, k) for c, k in zip(contexts, round_growth)]
    assert cached.history is not None
    assert all(e.pins == 0 for e in cached.history.cache.manager.entries.values())


class Counting:
    """Wraps the history cache's layer loop to count the tokens each forward computes."""

    def __init__(self, retriever: BatchRetriever):
        assert retriever.history is not None
        self.layers, self.computed = retriever.history.layers, []
        run = self.layers.run_layers

        def counted(x, *args):
            self.computed.append(len(x))
            return run(x, *args)

        setattr(self.layers, "run_layers", counted)  # noqa: B010 (an instance attribute over the method)


@pytest.mark.parametrize("dims", [{}, {"qk_dim": 12, "v_dim": 20}], ids=["one-head-dim", "qk12-v20"])
@pytest.mark.parametrize("time_bias_from", ["query", "next"])
def test_a_growing_history_computes_only_its_new_events_and_the_query(time_bias_from, dims):
    """Also for a model whose key and value heads differ in width (as imported checkpoints may)."""
    rng = np.random.default_rng(4)
    model = retrieval_model(time_bias_from, **dims)
    cached = BatchRetriever(model, NUM_ITEMS, CPU, window_bytes(model, 4, 8), 4)
    counter = Counting(cached)
    ctx = context(*events(rng, 6))
    for appended in (0, 3, 1, 0):
        ctx = grow(ctx, rng, appended)
        assert_same_as_uncached(cached, model, [RetrievalQuery(ctx, TOP, "u", 7)])
    # per round, the top-N then the second lookup (the query alone): all 6 events; 3 new events + the query
    # (the last query is now a context token); 1 new event + the query; the query alone
    assert counter.computed == [6, 1, 4, 1, 2, 1, 1, 1]
    stats = cached.stats()
    assert (stats["misses"], stats["hits"], stats["partial_hits"]) == (1, 5, 2)
    assert cached.history is not None and cached.history.cache.manager.entries["u"].tokens == 9


def test_a_window_that_slid_or_a_new_version_reuses_nothing():
    rng = np.random.default_rng(5)
    model = retrieval_model()
    cached = BatchRetriever(model, NUM_ITEMS, CPU, window_bytes(model, 4, 8), 4)
    counter = Counting(cached)
    ctx = context(*events(rng, WINDOW))
    cached.top_n([RetrievalQuery(ctx, TOP, "u", 0)])
    longer = grow(ctx, rng, 2)  # the window moved by 2: every position holds another event
    assert_same_as_uncached(cached, model, [RetrievalQuery(longer, TOP, "u", 0)])
    assert_same_as_uncached(cached, model, [RetrievalQuery(longer, TOP, "u", 1)])  # a history roll
    assert counter.computed == [WINDOW, WINDOW, 1, WINDOW, 1]
    cached.forget("u", 2)
    assert cached.stats()["users"] == 0


def test_retrievals_without_a_user_keep_nothing():
    rng = np.random.default_rng(6)
    model = retrieval_model()
    cached = BatchRetriever(model, NUM_ITEMS, CPU, window_bytes(model, 4, 2), 4)
    assert_same_as_uncached(cached, model, [RetrievalQuery(context(*events(rng, n)), TOP) for n in (3, 16, 9)])
    stats = cached.stats()
    assert stats["users"] == 0 and stats["occupancy"] == 0.0


def test_a_budget_below_one_window_is_refused():
    model = retrieval_model()
    with pytest.raises(ValueError, match="retrieval_cache_bytes"):
        BatchRetriever(model, NUM_ITEMS, CPU, window_bytes(model, 4, 1) - 1, 4)


def test_the_engine_caches_a_users_history_between_retrievals(model, catalog):
    retriever = retrieval_model(num_items=catalog.num_items)
    rng = np.random.default_rng(7)
    ctx = context(rng.integers(1, catalog.num_items + 1, size=9).astype(np.int64),
                  (956_700_000 + np.cumsum(rng.integers(0, 5000, size=9))).astype(np.int64))
    with Engine(model, catalog, EngineConfig(), retriever=retriever) as engine:
        for _ in range(2):
            got = engine.submit_retrieval(ctx, TOP, "u", 3).result(timeout=30)
            np.testing.assert_array_equal(got, retrieve_candidates(retriever, ctx, TOP, catalog.num_items))
        stats = engine.stats()["retrieval_cache"]
        assert (stats["misses"], stats["hits"], stats["users"]) == (1, 1, 1)
        engine.forget_user("u", 4).result(timeout=30)
        assert engine.retriever.stats()["users"] == 0
