import math

import numpy as np
import pytest

from grinfer.train.metrics import auc, gauc, hit_rate, ndcg


def test_auc_hand_computed():
    # positives 0.9, 0.4; negatives 0.5, 0.1 -> pairs (0.9>0.5, 0.9>0.1, 0.4<0.5, 0.4>0.1) = 3/4
    assert auc([1, 1, 0, 0], [0.9, 0.4, 0.5, 0.1]) == pytest.approx(0.75)


def test_auc_ties_count_half():
    assert auc([1, 0], [0.3, 0.3]) == pytest.approx(0.5)
    # positive 0.5 ties one negative and beats another -> (0.5 + 1) / 2
    assert auc([1, 0, 0], [0.5, 0.5, 0.2]) == pytest.approx(0.75)


def test_auc_single_class_is_nan():
    assert math.isnan(auc([1, 1], [0.1, 0.2]))


def test_auc_matches_pairwise_count():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = rng.integers(0, 20, 200).astype(float)  # many ties
    pos, neg = s[y == 1], s[y == 0]
    expected = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (
        len(pos) * len(neg))
    assert auc(y, s) == pytest.approx(expected)


def test_gauc_weights_by_group_size_and_skips_single_class_groups():
    labels = [1, 0, 0, 1, 0, 1, 1]
    scores = [0.9, 0.1, 0.2, 0.3, 0.8, 0.5, 0.6]
    groups = [0, 0, 1, 1, 1, 2, 2]
    # group 0: auc 1.0 (2 rows); group 1: positive 0.3 vs negatives 0.2, 0.8 -> 0.5 (3 rows); group 2 skipped
    assert gauc(labels, scores, groups) == pytest.approx((1.0 * 2 + 0.5 * 3) / 5)


def test_hit_rate_and_ndcg_hand_computed():
    ranks = np.array([0, 1, 9, 10, 50])
    assert hit_rate(ranks, 10) == pytest.approx(3 / 5)
    expected = (1 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(11)) / 5
    assert ndcg(ranks, 10) == pytest.approx(expected)
    assert ndcg(ranks, 1) == pytest.approx(1 / 5)
