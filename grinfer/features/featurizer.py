"""Builds jagged token batches from users' behaviour and the item catalogue."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from grinfer.data.types import ItemCatalog, UserTimeline
from grinfer.features.batch import EventTokens, MTGRBatch, RetrievalBatch
from grinfer.ops.groups import time_bucket

NUM_CROSS_FEATURES = 4  # genre affinity, rating on the item's genres, same-era share, already seen
FEATURES_VERSION = 2  # bump when token or cross features change meaning (cached demo models are keyed by it)


@dataclass
class UserContext:
    """A user's profile and time-ordered events; the first `num_static` are S, the rest R."""

    profile: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray
    ratings: np.ndarray
    num_static: int

    @classmethod
    def from_timeline(cls, user: UserTimeline, end: int | None = None, max_static: int = 1000,
                      max_realtime: int = 100, num_realtime: int = 0) -> UserContext:
        """Context from a timeline's events [.., end): the last `num_realtime` as R, the rest S (truncated)."""
        end = len(user) if end is None else end
        num_realtime = min(num_realtime, max_realtime, end)
        start = max(0, end - num_realtime - max_static)
        return cls(user.profile, user.items[start:end], user.timestamps[start:end], user.ratings[start:end],
                   num_static=end - start - num_realtime)


@dataclass
class FeatureRequest:
    """Score `candidates` for a user context at time `request_ts` (labels only when training)."""

    context: UserContext
    candidates: np.ndarray
    request_ts: int
    labels: np.ndarray | None = None  # [K, num_tasks]


class Featurizer:
    """Maps raw events to item/side-feature tokens and user x item cross features."""

    def __init__(self, catalog: ItemCatalog, num_time_buckets: int):
        self.genres = catalog.genres.astype(np.float32)
        self.years = catalog.year_bucket.astype(np.int64)
        self.num_time_buckets = num_time_buckets

    def _tokens(self, items: list[np.ndarray], ts: list[np.ndarray], actions: list[np.ndarray],
                prev_ts: list[np.ndarray]) -> EventTokens:
        lengths = torch.tensor([len(x) for x in items], dtype=torch.int64)
        cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64)
        item = cat(items).astype(np.int64)
        stamps = torch.from_numpy(cat(ts).astype(np.int64))
        gaps = time_bucket(stamps - torch.from_numpy(cat(prev_ts).astype(np.int64)), self.num_time_buckets)
        return EventTokens(
            offsets=torch.nn.functional.pad(torch.cumsum(lengths, 0), (1, 0)),
            items=torch.from_numpy(item), genres=torch.from_numpy(self.genres[item]),
            years=torch.from_numpy(self.years[item]), actions=torch.from_numpy(cat(actions).astype(np.int64)),
            timestamps=stamps, gaps=gaps)

    def cross_features(self, context: UserContext, candidates: np.ndarray) -> np.ndarray:
        """[K, NUM_CROSS_FEATURES] user x item features from per-user genre and era profiles.

        0: mean over the item's genres of the share of the user's events in that genre;
        1: mean over the item's genres of the user's centred rating ((r - 3) / 2) in that genre;
        2: share of the user's events from the item's era (year bucket); 3: item already in the context.
        O(n + K): the profiles are summed once per user, then looked up per candidate.
        """
        out = np.zeros((len(candidates), NUM_CROSS_FEATURES), np.float32)
        n = len(context.items)
        if n == 0 or len(candidates) == 0:
            return out
        ctx_genres, cand_genres = self.genres[context.items], self.genres[candidates]
        counts = ctx_genres.sum(0)  # [G]
        centred = (context.ratings.astype(np.float32) - 3.0) / 2.0
        genre_rating = (centred @ ctx_genres) / np.maximum(counts, 1)
        per_item = np.maximum(cand_genres.sum(1), 1)
        out[:, 0] = (cand_genres @ (counts / n)) / per_item
        out[:, 1] = (cand_genres @ genre_rating) / per_item
        era = np.bincount(self.years[context.items], minlength=self.years.max() + 1) / n
        out[:, 2] = era[self.years[candidates]]
        out[:, 3] = np.isin(candidates, context.items)
        return out

    def rank_batch(self, requests: list[FeatureRequest]) -> MTGRBatch:
        """One jagged ranking batch from a list of requests."""
        s_items, s_ts, s_act, s_prev = [], [], [], []
        r_items, r_ts, r_act, r_prev = [], [], [], []
        c_items, c_ts, c_prev, cross, labels = [], [], [], [], []
        for req in requests:
            ctx, n = req.context, req.context.num_static
            prev = np.concatenate([ctx.timestamps[:1], ctx.timestamps[:-1]])
            s_items.append(ctx.items[:n]), s_ts.append(ctx.timestamps[:n])
            s_act.append(ctx.ratings[:n]), s_prev.append(prev[:n])
            r_items.append(ctx.items[n:]), r_ts.append(ctx.timestamps[n:])
            r_act.append(ctx.ratings[n:]), r_prev.append(prev[n:])
            k = len(req.candidates)
            last = ctx.timestamps[-1] if len(ctx.timestamps) else req.request_ts
            c_items.append(req.candidates), c_ts.append(np.full(k, req.request_ts, np.int64))
            c_prev.append(np.full(k, last, np.int64))
            cross.append(self.cross_features(ctx, req.candidates))
            if req.labels is not None:
                labels.append(np.asarray(req.labels, np.float32).reshape(k, -1))
        candidates = self._tokens(c_items, c_ts, [np.zeros(len(c), np.int64) for c in c_items], c_prev)
        return MTGRBatch(
            profile=torch.from_numpy(np.stack([r.context.profile for r in requests]).astype(np.int64)),
            history=self._tokens(s_items, s_ts, s_act, s_prev),
            realtime=self._tokens(r_items, r_ts, r_act, r_prev),
            candidates=candidates,
            cross=torch.from_numpy(np.concatenate(cross)) if cross else torch.zeros(0, NUM_CROSS_FEATURES),
            request_ts=torch.tensor([r.request_ts for r in requests], dtype=torch.int64),
            labels=torch.from_numpy(np.concatenate(labels)) if len(labels) == len(requests) and labels else None,
        )


def retrieval_batch(sequences: list[tuple[np.ndarray, np.ndarray]], with_targets: bool) -> RetrievalBatch:
    """Batch (items, timestamps) sequences; with targets, position i predicts item i + 1."""
    for i, (items, stamps) in enumerate(sequences):
        if len(items) != len(stamps):
            raise ValueError(f"sequences[{i}]: {len(items)} items but {len(stamps)} timestamps")
    lengths = torch.tensor([len(s[0]) - int(with_targets) for s in sequences], dtype=torch.int64)
    items = np.concatenate([s[0][: len(s[0]) - int(with_targets)] for s in sequences]).astype(np.int64)
    ts = np.concatenate([s[1][: len(s[1]) - int(with_targets)] for s in sequences]).astype(np.int64)
    targets = None
    if with_targets:
        targets = torch.from_numpy(np.concatenate([s[0][1:] for s in sequences]).astype(np.int64))
    return RetrievalBatch(torch.nn.functional.pad(torch.cumsum(lengths, 0), (1, 0)),
                          torch.from_numpy(items), torch.from_numpy(ts), targets)
