"""DeviceFeaturizer (on CPU) against the numpy Featurizer on random ragged batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from grinfer.bench.workloads import bench_catalog
from grinfer.features import DeviceFeaturizer, EventTokens, FeatureRequest, Featurizer, MTGRBatch, UserContext

NUM_ITEMS = 60  # small, so that contexts repeat items and candidates are often already seen
CATALOG = bench_catalog(NUM_ITEMS, seed=3)
TOKEN_FIELDS = ("offsets", "items", "genres", "years", "actions", "timestamps", "gaps")


def make_request(rng: np.random.Generator, n: int, num_static: int, k: int, labels: bool = False,
                 dtype=np.int64) -> FeatureRequest:
    """Random context of n events (repeated items, equal timestamps) and k candidates (some repeated)."""
    stamps = 1_600_000_000 + np.cumsum(rng.choice([0, 0, 1, 7, 90, 3600, 86_400, 10**7], size=n))
    context = UserContext(rng.integers(1, 9, 4), rng.integers(1, NUM_ITEMS + 1, n).astype(dtype),
                          stamps.astype(np.int64), rng.integers(1, 6, n).astype(dtype), num_static)
    pool = np.r_[context.items, rng.integers(0, NUM_ITEMS + 1, k)]  # item 0 (unknown) included
    candidates = rng.choice(pool, size=k).astype(dtype) if len(pool) else np.zeros(0, dtype)
    request_ts = int(stamps[-1]) + int(rng.integers(0, 5000)) if n else 1_600_000_000
    return FeatureRequest(context, candidates, request_ts,
                       rng.random((k, 3)).astype(np.float32) if labels else None)


def random_batch(rng: np.random.Generator, b: int, labels: bool = False) -> list[FeatureRequest]:
    out = []
    for _ in range(b):
        n = int(rng.choice([0, 1, 2, 5, 17, 40]))
        num_static = int(rng.choice([0, n, rng.integers(0, n + 1), n + 3]))  # n + 3: slices clamp to n
        k = int(rng.choice([1, 3, 25])) if labels else int(rng.choice([0, 1, 3, 25]))
        out.append(make_request(rng, n, num_static, k, labels, dtype=rng.choice([np.int64, np.int32])))
    return out


def assert_tokens_equal(got: EventTokens, want: EventTokens, name: str) -> None:
    for field in TOKEN_FIELDS:
        g, w = getattr(got, field), getattr(want, field)
        assert g.device == torch.device("cpu") and g.dtype == w.dtype and g.shape == w.shape, (name, field)
        assert torch.equal(g, w), (name, field)


def assert_batches_equal(got: MTGRBatch, want: MTGRBatch) -> None:
    assert torch.equal(got.profile, want.profile) and got.profile.dtype == want.profile.dtype
    assert torch.equal(got.request_ts, want.request_ts) and got.request_ts.dtype == torch.int64
    for name in ("history", "realtime", "candidates"):
        assert_tokens_equal(getattr(got, name), getattr(want, name), name)
    assert got.cross.dtype == torch.float32 and got.cross.shape == want.cross.shape
    torch.testing.assert_close(got.cross, want.cross, rtol=1e-5, atol=1e-6)
    if want.labels is None:
        assert got.labels is None
    else:
        assert got.labels.dtype == torch.float32 and torch.equal(got.labels, want.labels)


def check(requests: list[FeatureRequest], num_time_buckets: int = 32) -> MTGRBatch:
    want = Featurizer(CATALOG, num_time_buckets).rank_batch(requests)
    got = DeviceFeaturizer(CATALOG, num_time_buckets, "cpu").rank_batch(requests)
    assert_batches_equal(got, want)
    return want


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("b", [1, 3, 32])
def test_random_ragged_batches(seed: int, b: int):
    check(random_batch(np.random.default_rng(seed * 100 + b), b))


@pytest.mark.parametrize("seed", range(6))
def test_labels(seed: int):
    rng = np.random.default_rng(seed)
    requests = random_batch(rng, 9, labels=True)
    assert check(requests).labels.shape == (sum(len(r.candidates) for r in requests), 3)
    requests[4].labels = None  # labels only when every request has them
    assert check(requests).labels is None


@pytest.mark.parametrize("num_time_buckets", [1, 4, 64])
def test_time_buckets(num_time_buckets: int):
    check(random_batch(np.random.default_rng(7), 16), num_time_buckets)


@pytest.mark.parametrize(("n", "num_static", "k"), [
    (0, 0, 5),  # empty context: zero cross features, candidate gap from request_ts to itself
    (6, 0, 5),  # all R
    (6, 6, 5),  # all S
    (6, 2, 0),  # no candidates
    (0, 0, 0),
])
def test_edge_shapes_alone_and_in_a_batch(n: int, num_static: int, k: int):
    rng = np.random.default_rng(n * 10 + k)
    edge = make_request(rng, n, num_static, k)
    want = check([edge])
    assert len(want.history.items) == min(num_static, n) and len(want.candidates.items) == k
    check([make_request(rng, 8, 3, 4), edge, make_request(rng, 5, 5, 6), edge])


def test_cross_features_are_exercised():
    """The comparison is not vacuous: every cross feature takes non-zero and varied values."""
    rng = np.random.default_rng(1)
    want = check(random_batch(rng, 32))
    for f in range(want.cross.shape[1]):
        assert (want.cross[:, f] != 0).any() and len(torch.unique(want.cross[:, f])) > 1, f
    assert len(torch.unique(want.history.gaps)) > 2 and len(torch.unique(want.candidates.gaps)) > 2


def test_cross_features_of_a_known_user():
    """Hand-checked values, independent of the numpy twin."""
    ctx = UserContext(np.array([1, 2]), np.array([5, 5, 9]), np.array([10, 10, 20]), np.array([5, 4, 1]), 1)
    batch = DeviceFeaturizer(CATALOG, 16, "cpu").rank_batch(
        [FeatureRequest(ctx, np.array([5, 11]), 100), FeatureRequest(ctx, np.array([9]), 100)])
    genres, years = CATALOG.genres.astype(np.float32), CATALOG.year_bucket
    g5, g9 = genres[5], genres[9]
    counts = 2 * g5 + g9
    rating = (1.5 * g5 - 1.0 * g9) / np.maximum(counts, 1)  # centred ratings 1, 0.5, -1
    for cand, row in ((5, batch.cross[0]), (11, batch.cross[1]), (9, batch.cross[2])):
        gc = genres[cand]
        same_era = np.mean(years[[5, 5, 9]] == years[cand])
        want = [gc @ (counts / 3) / max(gc.sum(), 1), gc @ rating / max(gc.sum(), 1), same_era, cand in (5, 9)]
        np.testing.assert_allclose(row.numpy(), want, rtol=1e-6, atol=1e-7)
    assert batch.history.items.tolist() == [5, 5] and batch.realtime.items.tolist() == [5, 9, 5, 9]
    assert batch.history.timestamps.tolist() == [10, 10] and batch.realtime.offsets.tolist() == [0, 2, 4]
    assert batch.candidates.timestamps.tolist() == [100, 100, 100]


def test_no_requests():
    with pytest.raises(ValueError, match="no requests"):
        DeviceFeaturizer(CATALOG, 16, "cpu").rank_batch([])
