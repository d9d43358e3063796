"""Ranking and retrieval metrics: AUC, GAUC, HR@k and NDCG@k."""

from __future__ import annotations

import numpy as np


def _average_ranks(scores: np.ndarray) -> np.ndarray:
    """1-based ranks of `scores`, ties sharing their average rank."""
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), np.float64)
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(scores)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2.0
    return ranks


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (ties count one half); NaN when only one class is present."""
    labels = np.asarray(labels).astype(bool)
    pos, neg = labels.sum(), (~labels).sum()
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = _average_ranks(np.asarray(scores, np.float64))
    return float((ranks[labels].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def gauc(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> float:
    """Per-group AUC averaged with weights = group size, over groups holding both classes."""
    labels, scores, groups = np.asarray(labels), np.asarray(scores), np.asarray(groups)
    total, weight = 0.0, 0
    for g in np.unique(groups):
        sel = groups == g
        value = auc(labels[sel], scores[sel])
        if not np.isnan(value):
            total += value * sel.sum()
            weight += sel.sum()
    return float(total / weight) if weight else float("nan")


def hit_rate(ranks: np.ndarray, k: int) -> float:
    """Share of targets ranked within the top k (ranks are 0-based)."""
    return float((np.asarray(ranks) < k).mean())


def ndcg(ranks: np.ndarray, k: int) -> float:
    """NDCG@k with one relevant item per query: 1 / log2(rank + 2) inside the top k, else 0."""
    ranks = np.asarray(ranks, np.float64)
    return float(np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0).mean())
