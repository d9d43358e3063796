import numpy as np
import pytest
import torch

from grinfer.data import generate_synthetic
from grinfer.data.splits import ranking_cut, retrieval_eval_point, retrieval_train_items, task_labels
from grinfer.data.types import UserTimeline
from grinfer.features import FeatureRequest, Featurizer, UserContext, retrieval_batch
from grinfer.train.ranking import ContextLimits, evaluation_requests, training_requests


def _user(n):
    return UserTimeline(7, np.array([1, 2, 3, 4]), np.arange(1, n + 1), np.arange(n) * 10, np.ones(n, np.int64) * 4)


def test_ranking_cut_is_last_ten_percent_at_least_one():
    assert ranking_cut(_user(100)) == 90
    assert ranking_cut(_user(15)) == 13  # ceil(1.5) = 2 evaluation events
    assert ranking_cut(_user(3)) == 2


def test_retrieval_split_points():
    u = _user(10)
    assert retrieval_train_items(u) == 8
    assert retrieval_eval_point(u, "valid") == 8
    assert retrieval_eval_point(u, "test") == 9
    with pytest.raises(ValueError, match="split"):
        retrieval_eval_point(u, "train")


def test_task_labels():
    labels = task_labels(np.array([1, 3, 4, 5]), ("ctr", "ctcvr"))
    np.testing.assert_array_equal(labels, [[0, 0], [0, 0], [1, 0], [1, 1]])
    with pytest.raises(ValueError, match="tasks"):
        task_labels(np.array([1]), ("watch_time",))


def test_training_windows_cover_train_events_once_and_never_eval_events():
    ds = generate_synthetic(num_users=20, num_items=100, mean_events=30, seed=1)
    limits = ContextLimits(max_static=10, num_realtime=3, window=4)
    reqs = training_requests(ds, ("ctr", "ctcvr"), limits)
    per_user_candidates = {}
    for r in reqs:
        assert len(r.context.items) <= 13 and len(r.context.items) - r.context.num_static <= 3
        assert r.request_ts >= r.context.timestamps[-1]
        assert len(r.candidates) <= 4
    covered = sum(len(r.candidates) for r in reqs)
    assert covered == sum(ranking_cut(u) - 1 for u in ds.users)
    for u, r in zip(ds.users, evaluation_requests(ds, ("ctr",), limits)):
        np.testing.assert_array_equal(r.candidates, u.items[ranking_cut(u):])
        assert per_user_candidates.get(u.user_id) is None


def test_context_split_into_static_and_realtime():
    u = _user(50)
    ctx = UserContext.from_timeline(u, end=40, max_static=20, num_realtime=5)
    np.testing.assert_array_equal(ctx.items, u.items[15:40])
    assert ctx.num_static == 20


def test_rank_batch_is_jagged_and_cross_features_are_right(catalog):
    fz = Featurizer(catalog, 64)
    ctx = UserContext(np.array([1, 1, 1, 1]), np.array([1, 2, 3]), np.array([0, 10, 20]), np.array([5, 1, 4]), 2)
    empty = UserContext(np.array([2, 2, 2, 2]), np.zeros(0, np.int64), np.zeros(0, np.int64),
                        np.zeros(0, np.int64), 0)
    batch = fz.rank_batch([FeatureRequest(ctx, np.array([2, 9]), 30), FeatureRequest(empty, np.array([4]), 30)])
    assert batch.history.offsets.tolist() == [0, 2, 2]
    assert batch.realtime.offsets.tolist() == [0, 1, 1]
    assert batch.candidates.offsets.tolist() == [0, 2, 3]
    assert batch.cross.shape == (3, 4)
    assert batch.cross[0, 3] == 1.0 and batch.cross[1, 3] == 0.0  # item 2 already seen, item 9 not
    g = catalog.genres.astype(float)
    item_genres = np.flatnonzero(g[9])
    share = np.mean([np.mean([g[i, k] for i in (1, 2, 3)]) for k in item_genres])  # hand-computed, per genre
    assert batch.cross[1, 0] == pytest.approx(share)
    ratings = {1: 1.0, 2: -1.0, 3: 0.5}  # (r - 3) / 2 for ratings 5, 1, 4
    per_genre = [np.mean([ratings[i] for i in (1, 2, 3) if g[i, k]]) if g[[1, 2, 3], k].any() else 0.0
                 for k in item_genres]
    assert batch.cross[1, 1] == pytest.approx(np.mean(per_genre))
    years = catalog.year_bucket
    assert batch.cross[1, 2] == pytest.approx(np.mean([years[i] == years[9] for i in (1, 2, 3)]))
    assert torch.all(batch.cross[2] == 0)  # no context, no cross signal
    assert batch.candidates.actions.tolist() == [0, 0, 0]


def test_retrieval_batch_targets_shift_by_one():
    b = retrieval_batch([(np.array([5, 6, 7]), np.array([1, 2, 3])), (np.array([8, 9]), np.array([4, 5]))], True)
    assert b.offsets.tolist() == [0, 2, 3]
    assert b.items.tolist() == [5, 6, 8]
    assert b.targets.tolist() == [6, 7, 9]


def test_retrieval_batch_rejects_mismatched_timestamps():
    with pytest.raises(ValueError, match=r"sequences\[0\]: 5 items but 6 timestamps"):
        retrieval_batch([(np.arange(1, 6), np.arange(6))], False)
