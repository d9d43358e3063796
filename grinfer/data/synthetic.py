"""Synthetic MovieLens-shaped data with structure a recommender can learn.

The world: items with Zipf-like popularity, a primary genre (plus up to two extra genres), a
year bucket and a hidden quality; a few latent taste clusters, each fond of three genres, whose
membership shifts the users' gender / age / occupation mix. A user's next item continues the
genre of the previous one with probability ``p_continue``, otherwise follows the cluster's genre
taste, and sometimes (``p_explore``) is drawn from global popularity; an item is never repeated
within a user. Ratings rise with the item's fit to the cluster's taste and its quality, plus noise.
"""

from __future__ import annotations

import numpy as np

from grinfer.data.movielens import (
    AGE_CODES,
    ML1M_GENRES,
    NUM_OCCUPATIONS,
    NUM_YEAR_BUCKETS,
    PROFILE_CARDINALITIES,
)
from grinfer.data.types import PROFILE_FIELDS, Dataset, ItemCatalog, UserTimeline

_NUM_GENRES = len(ML1M_GENRES)
_FAVOURITE_GENRES = 3  # per cluster
_START_TIME = 956_700_000  # late April 2000, where MovieLens-1M begins
_SEEN_BITMAP_CELLS = 1 << 24  # bounds the per-chunk "already consumed" bitmap
_RETRIES = 6  # redraws when a user would repeat an item: half in-genre, half by global popularity


def generate_synthetic(
    num_users: int = 1000,
    num_items: int = 2000,
    mean_events: float = 60,
    seed: int = 0,
    *,
    num_clusters: int = 6,
    min_events: int = 5,
    p_continue: float = 0.5,
    p_explore: float = 0.1,
    zipf_exponent: float = 1.0,
    rating_noise: float = 0.7,
) -> Dataset:
    """Generate a dataset shaped like :func:`read_movielens` output, fully determined by ``seed``.

    Users get ids 1..num_users, a profile in the MovieLens-1M vocabularies and a lognormal number
    of events around ``mean_events`` (at least ``min_events``, at most ``num_items``); timestamps
    are non-decreasing with random gaps, some of them zero.
    """
    if num_users < 1 or num_items < 1 or mean_events <= 0 or num_clusters < 1:
        raise ValueError("num_users, num_items, mean_events and num_clusters must be positive")
    rng = np.random.default_rng(seed)
    catalog, primary, popularity, quality = _make_items(rng, num_items, zipf_exponent)

    present = np.bincount(primary, minlength=_NUM_GENRES) > 0
    preference = rng.uniform(0.0, 0.3, size=(num_clusters, _NUM_GENRES))
    for k in range(num_clusters):
        preference[k, rng.choice(_NUM_GENRES, _FAVOURITE_GENRES, replace=False)] = 1.0
    genre_taste = preference**2 * present
    genre_taste /= genre_taste.sum(axis=1, keepdims=True)
    # fit[k, i]: how well item i (dense id i + 1) suits cluster k, the best of its genres.
    fit = np.stack([(catalog.genres[1:] * preference[k]).max(axis=1) for k in range(num_clusters)])

    cluster = rng.choice(num_clusters, size=num_users, p=rng.dirichlet(np.full(num_clusters, 5.0)))
    profiles = _make_profiles(rng, cluster, num_clusters)
    sigma = 0.7
    counts = np.rint(mean_events * rng.lognormal(-(sigma**2) / 2, sigma, size=num_users)).astype(np.int64)
    counts = np.clip(counts, min_events, None).clip(None, num_items)

    sampler = _ItemSampler(primary, popularity, genre_taste, p_continue, p_explore)
    chunk = max(1, _SEEN_BITMAP_CELLS // num_items)
    item = np.concatenate(
        [sampler.sample(rng, cluster[lo : lo + chunk], counts[lo : lo + chunk]) for lo in range(0, num_users, chunk)]
    )
    owner = np.repeat(np.arange(num_users), counts)  # user index of each event
    starts = np.cumsum(counts) - counts

    score = 1.6 + 2.6 * fit[cluster[owner], item] + 0.35 * quality[item] + rng.normal(0.0, 0.35, num_users)[owner]
    ratings = np.clip(np.rint(score + rng.normal(0.0, rating_noise, size=len(item))), 1, 5).astype(np.int64)
    gaps = _gaps(rng, len(item))
    gaps[starts] = 0
    elapsed = np.cumsum(gaps)
    times = (_START_TIME + rng.integers(0, 80_000_000, size=num_users))[owner] + elapsed - elapsed[starts][owner]

    bounds = starts[1:]
    users = [
        UserTimeline(user_id=u + 1, profile=profiles[u], items=i + 1, timestamps=t, ratings=r)
        for u, (i, t, r) in enumerate(zip(np.split(item, bounds), np.split(times, bounds), np.split(ratings, bounds)))
    ]
    return Dataset(
        name=f"synthetic-u{num_users}-i{num_items}-e{mean_events:g}-s{seed}",
        catalog=catalog,
        users=users,
        profile_fields=PROFILE_FIELDS,
        profile_cardinalities=PROFILE_CARDINALITIES,
    )


def _make_items(
    rng: np.random.Generator, num_items: int, zipf_exponent: float
) -> tuple[ItemCatalog, np.ndarray, np.ndarray, np.ndarray]:
    """Catalogue plus, per item index (dense id - 1): primary genre, popularity weight, quality."""
    genre_freq = rng.dirichlet(np.full(_NUM_GENRES, 2.0))
    filler = rng.choice(_NUM_GENRES, size=max(num_items - _NUM_GENRES, 0), p=genre_freq)
    primary = rng.permutation(np.concatenate([np.arange(_NUM_GENRES), filler]))[:num_items]
    genres = np.zeros((num_items + 1, _NUM_GENRES), dtype=np.uint8)
    genres[np.arange(1, num_items + 1), primary] = 1
    num_extra = rng.choice(3, size=num_items, p=[0.5, 0.35, 0.15])
    for slot in range(2):
        rows = np.flatnonzero(num_extra > slot)
        genres[rows + 1, rng.integers(0, _NUM_GENRES, size=len(rows))] = 1

    year_weights = np.exp(0.25 * np.arange(NUM_YEAR_BUCKETS))
    years = np.zeros(num_items + 1, dtype=np.int64)
    years[1:] = 1 + rng.choice(NUM_YEAR_BUCKETS, size=num_items, p=year_weights / year_weights.sum())

    rank = rng.permutation(num_items) + 1
    popularity = rank.astype(np.float64) ** -zipf_exponent
    log_pop = np.log(popularity)
    quality = 0.3 * (log_pop - log_pop.mean()) / (log_pop.std() + 1e-9) + rng.normal(size=num_items)

    catalog = ItemCatalog(
        genres=genres,
        year_bucket=years,
        titles=[""] + [f"Synthetic item {i}" for i in range(1, num_items + 1)],
        genre_names=list(ML1M_GENRES),
        raw_ids=np.arange(num_items + 1, dtype=np.int64),
    )
    return catalog, primary, popularity, quality


def _make_profiles(rng: np.random.Generator, cluster: np.ndarray, num_clusters: int) -> np.ndarray:
    """Profiles [num_users, 4] (gender, age, occupation, zip) whose mix depends on the cluster."""
    p_female = rng.uniform(0.1, 0.9, size=num_clusters)
    age_mix = rng.dirichlet(np.full(len(AGE_CODES), 0.7), size=num_clusters)
    occupation_mix = rng.dirichlet(np.full(NUM_OCCUPATIONS, 0.7), size=num_clusters)
    n = len(cluster)
    profiles = np.empty((n, len(PROFILE_FIELDS)), dtype=np.int64)
    profiles[:, 0] = np.where(rng.random(n) < p_female[cluster], 1, 2)
    profiles[:, 1] = 1 + _categorical(rng, age_mix[cluster])
    profiles[:, 2] = 1 + _categorical(rng, occupation_mix[cluster])
    profiles[:, 3] = rng.integers(1, PROFILE_CARDINALITIES[3], size=n)
    return profiles


def _categorical(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One draw per row of ``probs`` [n, k] (rows sum to 1)."""
    cdf = np.cumsum(probs, axis=1)
    return np.minimum((rng.random((len(probs), 1)) > cdf).sum(axis=1), probs.shape[1] - 1)


def _gaps(rng: np.random.Generator, n: int) -> np.ndarray:
    """Seconds between consecutive events: bursts of minutes, some ties, occasional days apart."""
    gaps = rng.exponential(180.0, size=n)
    long_gap = rng.random(n) < 0.05
    gaps[long_gap] = rng.exponential(7 * 86_400.0, size=int(long_gap.sum()))
    gaps[rng.random(n) < 0.1] = 0.0
    return gaps.astype(np.int64)


class _ItemSampler:
    """Draws item sequences (item indices, no repeats within a user) step by step for many users.

    Requires ``counts <= num_items`` so that every user can always find an unseen item.
    """

    def __init__(
        self,
        primary: np.ndarray,
        popularity: np.ndarray,
        genre_taste: np.ndarray,
        p_continue: float,
        p_explore: float,
    ) -> None:
        self.primary = primary
        self.num_items = len(primary)
        self.present = np.flatnonzero(genre_taste.sum(axis=0) > 0)  # genres that have items
        self.taste_cdf = np.cumsum(genre_taste[:, self.present], axis=1)
        self.p_continue = p_continue
        self.p_explore = p_explore
        self.pop_cdf = np.cumsum(popularity) / popularity.sum()
        # Items grouped by primary genre; within genre g the popularity CDF is shifted to (g, g + 1]
        # so that one searchsorted over the concatenation draws from any mix of genres at once.
        self.by_genre = np.argsort(primary, kind="stable")
        grouped = primary[self.by_genre]
        self.genre_start = np.searchsorted(grouped, np.arange(_NUM_GENRES), side="left")
        self.genre_end = np.searchsorted(grouped, np.arange(_NUM_GENRES), side="right")
        cum = np.empty(self.num_items)
        for g in range(_NUM_GENRES):
            s, e = self.genre_start[g], self.genre_end[g]
            if e > s:
                w = np.cumsum(popularity[self.by_genre[s:e]])
                cum[s:e] = g + w / w[-1]
        self.genre_cdf = cum

    def sample(self, rng: np.random.Generator, cluster: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Item indices of all users' events, user after user, ``counts[u]`` distinct items for user u."""
        n_users = len(cluster)
        order = np.argsort(-counts, kind="stable")  # active users at step t are a prefix
        cluster_sorted, counts_sorted = cluster[order], counts[order]
        steps = int(counts_sorted[0])
        seen = np.zeros((n_users, self.num_items), dtype=bool)
        out = np.zeros((n_users, steps), dtype=np.int64)
        prev_genre = np.zeros(n_users, dtype=np.int64)
        for t in range(steps):
            m = int(np.searchsorted(-counts_sorted, -t, side="left"))  # users with counts > t
            rows = np.arange(m)
            genre = self._next_genre(rng, cluster_sorted[:m], prev_genre[:m], first=t == 0)
            explore = rng.random(m) < self.p_explore
            item = np.where(explore, self._popular(rng, m), self._in_genre(rng, genre))
            for attempt in range(_RETRIES + 1):
                clash = np.flatnonzero(seen[rows, item])
                if len(clash) == 0:
                    break
                if attempt < _RETRIES // 2:
                    item[clash] = self._in_genre(rng, genre[clash])
                elif attempt < _RETRIES:
                    item[clash] = self._popular(rng, len(clash))
                else:  # rare: a uniformly random unseen item (one exists as counts <= num_items)
                    noise = rng.random((len(clash), self.num_items))
                    noise[seen[clash]] = -1.0
                    item[clash] = noise.argmax(axis=1)
            seen[rows, item] = True
            out[:m, t] = item
            prev_genre[:m] = self.primary[item]
        result = np.empty_like(out)
        result[order] = out
        return result[np.arange(steps)[None, :] < counts[:, None]]

    def _next_genre(self, rng: np.random.Generator, cluster: np.ndarray, prev: np.ndarray, first: bool) -> np.ndarray:
        u = rng.random((len(cluster), 1))
        genre = self.present[np.minimum((u > self.taste_cdf[cluster]).sum(axis=1), len(self.present) - 1)]
        if first:
            return genre
        return np.where(rng.random(len(cluster)) < self.p_continue, prev, genre)

    def _in_genre(self, rng: np.random.Generator, genre: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(self.genre_cdf, genre + rng.random(len(genre)), side="right")
        pos = np.clip(pos, self.genre_start[genre], self.genre_end[genre] - 1)
        return self.by_genre[pos]

    def _popular(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.minimum(np.searchsorted(self.pop_cdf, rng.random(n), side="right"), self.num_items - 1)
