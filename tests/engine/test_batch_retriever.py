"""Retrieval on the engine's thread, batched: the same top-n as `retrieve_candidates` one user at a time."""

from __future__ import annotations

import threading
import time

import numpy as np
import torch

from grinfer.config import EngineConfig, preset
from grinfer.engine import Engine
from grinfer.engine.retrieval import BatchRetriever, RetrievalQuery
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
    queries = [RetrievalQuery(context(rng, n), k) for n, k in [(5, 10), (40, 7), (0, 5), (12, 200), (1, 1)]]
    got = BatchRetriever(model, NUM_ITEMS, torch.device("cpu")).top_n(queries)
    for (ctx, k), items in zip([(q.context, q.n) for q in queries], got):
        want = retrieve_candidates(model, ctx, k, NUM_ITEMS)
        np.testing.assert_array_equal(items, want)
        assert not set(items.tolist()) & set(ctx.items.tolist()) and 0 not in items.tolist()
    assert len(got[3]) == NUM_ITEMS - len(np.unique(queries[3].context.items))


def test_without_a_model_every_unseen_item_is_a_candidate():
    rng = np.random.default_rng(2)
    ctx = context(rng, 8)
    (items,) = BatchRetriever(None, NUM_ITEMS, torch.device("cpu")).top_n([RetrievalQuery(ctx, 5)])
    np.testing.assert_array_equal(items, np.setdiff1d(np.arange(1, NUM_ITEMS + 1), ctx.items))


class _SlowLock:
    """A lock whose callers from other threads than the engine's pause before taking it, widening the gap
    between a submitter reading the engine's queue and appending to it."""

    def __init__(self):
        self.lock = threading.Lock()

    def acquire(self, *args):
        if threading.current_thread().name != "grinfer-engine":
            time.sleep(0.0005)
        return self.lock.acquire(*args)

    def release(self):
        self.lock.release()

    __enter__ = acquire

    def __exit__(self, *exc):
        self.release()


def test_no_retrieval_or_call_is_lost_when_submitted_from_many_threads(model, catalog):
    """The loop swaps its queues out under the lock; a submitter must never append to a list it read before
    taking the lock (a lost retrieval hung the server's warm-up once)."""
    rng = np.random.default_rng(3)
    contexts = [context(rng, 4) for _ in range(8)]
    futures, lock = [], threading.Lock()

    def submit(engine):
        for i in range(200):
            f = engine.submit_retrieval(contexts[i % 8], 3) if i % 3 else engine.call(lambda i=i: i)
            with lock:
                futures.append(f)

    engine = Engine(model, catalog, EngineConfig(max_queue=4096))
    engine._lock = _SlowLock()
    engine._wake = threading.Condition(engine._lock)
    with engine:
        threads = [threading.Thread(target=submit, args=(engine,)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for f in futures:
            f.result(timeout=20)
    assert len(futures) == 800
