"""Synthetic generator: determinism, MovieLens-compatible shape, learnable structure; load_dataset specs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from grinfer.data import Dataset, generate_synthetic, load_dataset
from grinfer.data.movielens import ML1M_GENRES


@pytest.fixture(scope="module")
def default() -> Dataset:
    return generate_synthetic()


def _flat(ds: Dataset) -> list[tuple[int, list[int], list[int], list[int], list[int]]]:
    return [
        (u.user_id, u.profile.tolist(), u.items.tolist(), u.timestamps.tolist(), u.ratings.tolist()) for u in ds.users
    ]


def assert_same(a: Dataset, b: Dataset) -> None:
    assert a.name == b.name
    assert _flat(a) == _flat(b)
    for field in ("genres", "year_bucket", "raw_ids"):
        np.testing.assert_array_equal(getattr(a.catalog, field), getattr(b.catalog, field))
    assert a.catalog.titles == b.catalog.titles


def test_same_seed_same_data(default: Dataset) -> None:
    assert_same(default, generate_synthetic(seed=0))


def test_different_seeds_differ() -> None:
    a, b = generate_synthetic(200, 300, 20, seed=1), generate_synthetic(200, 300, 20, seed=2)
    assert _flat(a) != _flat(b)
    assert not np.array_equal(a.catalog.genres, b.catalog.genres)


def test_shape_matches_movielens(default: Dataset) -> None:
    ds, cat = default, default.catalog
    assert ds.profile_fields == ("gender", "age", "occupation", "zip")
    assert ds.profile_cardinalities == (3, 8, 22, 101)
    assert cat.genre_names == list(ML1M_GENRES)
    assert cat.num_items == 2000
    assert cat.genres.dtype == np.uint8 and cat.genres.shape == (2001, 18)
    assert cat.genres[0].sum() == 0 and cat.genres[1:].sum(axis=1).min() >= 1
    assert cat.year_bucket[0] == 0 and cat.year_bucket[1:].min() >= 1 and cat.year_bucket.max() <= 18
    assert cat.titles[0] == "" and cat.titles[17] == "Synthetic item 17"
    assert cat.raw_ids.tolist() == list(range(2001))

    assert [u.user_id for u in ds.users] == list(range(1, 1001))
    cards = np.array(ds.profile_cardinalities)
    lengths = np.array([len(u) for u in ds.users])
    assert lengths.min() >= 5 and 50 < lengths.mean() < 75 and lengths.std() > 20
    ties = 0
    for u in ds.users:
        assert u.profile.dtype == np.int64 and np.all((u.profile >= 1) & (u.profile < cards))
        for arr in (u.items, u.timestamps, u.ratings):
            assert arr.dtype == np.int64 and arr.shape == (len(u),)
        assert u.items.min() >= 1 and u.items.max() <= 2000
        assert len(np.unique(u.items)) == len(u)  # no repeats within a user
        assert u.ratings.min() >= 1 and u.ratings.max() <= 5
        gaps = np.diff(u.timestamps)
        assert np.all(gaps >= 0)
        ties += int((gaps == 0).sum())
    assert ties > 0


def test_small_catalogue_and_min_events() -> None:
    ds = generate_synthetic(num_users=30, num_items=10, mean_events=1000, seed=4)
    assert all(len(u) == 10 and len(np.unique(u.items)) == 10 for u in ds.users)  # capped at num_items
    ds = generate_synthetic(num_users=100, num_items=500, mean_events=2, seed=4, min_events=7)
    assert min(len(u) for u in ds.users) == 7


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        generate_synthetic(num_users=0)
    with pytest.raises(ValueError):
        generate_synthetic(num_items=0)


def test_popularity_is_skewed(default: Dataset) -> None:
    items = np.concatenate([u.items for u in default.users])
    counts = np.sort(np.bincount(items, minlength=2001)[1:])[::-1]
    assert counts[:200].sum() / counts.sum() > 0.4  # top 10% of items take a large share


def test_ratings_follow_taste(default: Dataset) -> None:
    genres = default.catalog.genres
    liked, other = [], []
    for u in default.users:
        g = genres[u.items]
        in_top = g[:, g.sum(axis=0).argmax()] == 1  # the user's most consumed genre
        liked.append(u.ratings[in_top])
        other.append(u.ratings[~in_top])
    liked_r, other_r = np.concatenate(liked), np.concatenate(other)
    assert liked_r.mean() - other_r.mean() > 0.5
    assert (liked_r >= 4).mean() - (other_r >= 4).mean() > 0.2
    assert 0.05 < (np.concatenate([liked_r, other_r]) == 5).mean() < 0.5  # both labels are mixed


def test_next_item_tends_to_continue_the_genre(default: Dataset) -> None:
    genres = default.catalog.genres
    consecutive = np.concatenate([(genres[u.items[1:]] & genres[u.items[:-1]]).any(axis=1) for u in default.users])
    rng = np.random.default_rng(0)
    items = np.concatenate([u.items for u in default.users])
    a, b = rng.choice(items, 20_000), rng.choice(items, 20_000)
    assert consecutive.mean() > 2 * (genres[a] & genres[b]).any(axis=1).mean()


def test_genre_taste_depends_on_profile(default: Dataset) -> None:
    profiles = np.array([u.profile for u in default.users])
    shares = np.array([default.catalog.genres[u.items].mean(axis=0) for u in default.users])
    by_age = [shares[profiles[:, 1] == age].mean(axis=0) for age in range(1, 8) if (profiles[:, 1] == age).sum() >= 30]
    spread = np.max(by_age, axis=0) - np.min(by_age, axis=0)
    assert len(by_age) >= 3 and spread.max() > 0.05


def test_load_dataset_synthetic_specs() -> None:
    small = load_dataset("synthetic:users=50,items=80,events=10,seed=3")
    assert len(small.users) == 50 and small.catalog.num_items == 80
    assert_same(small, generate_synthetic(num_users=50, num_items=80, mean_events=10, seed=3))
    assert_same(load_dataset("synthetic:seed=5, users=20"), generate_synthetic(num_users=20, seed=5))


def test_load_dataset_default_synthetic(default: Dataset) -> None:
    assert_same(load_dataset("synthetic"), default)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("synthetic:bogus=3", "bogus"),
        ("synthetic:users=3,colour=red", "colour"),
        ("synthetic:users=many", "users"),
        ("synthetic:users", "users"),
        ("synthetic:seed=1,seed=2", "seed"),
    ],
)
def test_load_dataset_bad_synthetic_spec(spec: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_dataset(spec)


def test_load_dataset_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-ml"
    with pytest.raises(FileNotFoundError, match="no-such-ml"):
        load_dataset(str(missing))
