"""Shared fixtures: a small random item catalogue, a featurizer and a random ranking-request builder."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from model_util import SERVED_SPEC  # re-exported for the fixtures below; import it from model_util

from grinfer.config import ModelConfig, preset
from grinfer.data.types import ItemCatalog
from grinfer.features import FeatureRequest, Featurizer, UserContext

NUM_ITEMS = 40
NUM_GENRES = 18
NUM_YEAR_BUCKETS = 19
PROFILE_CARDINALITIES = (3, 8, 22, 101)
START_TS = 956_700_000

# Tests use tiny tensors: one intra-op thread avoids thread hand-off costs that dominate (and get
# very slow on a busy 2-core machine); results do not depend on it.
torch.set_num_threads(1)


def make_catalog(num_items: int = NUM_ITEMS, seed: int = 0) -> ItemCatalog:
    """A random catalogue: every real item has 1-3 genres and a non-zero year bucket; row 0 is unknown."""
    rng = np.random.default_rng(seed)
    genres = np.zeros((num_items + 1, NUM_GENRES), np.uint8)
    for i in range(1, num_items + 1):
        genres[i, rng.choice(NUM_GENRES, size=rng.integers(1, 4), replace=False)] = 1
    years = np.concatenate([[0], rng.integers(1, NUM_YEAR_BUCKETS, size=num_items)]).astype(np.int64)
    years[1] = NUM_YEAR_BUCKETS - 1  # so that catalog.num_year_buckets == NUM_YEAR_BUCKETS
    return ItemCatalog(
        genres=genres,
        year_bucket=years,
        titles=[""] + [f"item {i}" for i in range(1, num_items + 1)],
        genre_names=[f"g{g}" for g in range(NUM_GENRES)],
        raw_ids=np.arange(num_items + 1, dtype=np.int64) * 7,
    )


@pytest.fixture(scope="session")
def catalog() -> ItemCatalog:
    return make_catalog()


@pytest.fixture(scope="session")
def mtgr_cfg(catalog: ItemCatalog) -> ModelConfig:
    """mtgr-tiny sized for the random catalogue."""
    return preset("mtgr-tiny").with_vocab(
        num_items=catalog.num_items, num_genres=catalog.num_genres, num_year_buckets=catalog.num_year_buckets,
        profile_cardinalities=PROFILE_CARDINALITIES)


@pytest.fixture(scope="session")
def featurizer(catalog: ItemCatalog, mtgr_cfg: ModelConfig) -> Featurizer:
    return Featurizer(catalog, mtgr_cfg.num_time_buckets)


RequestBuilder = Callable[..., FeatureRequest]


def build_request(rng: np.random.Generator, num_static: int, num_realtime: int, num_candidates: int,
                  num_items: int = NUM_ITEMS, num_tasks: int = 2) -> FeatureRequest:
    """A random request: time-ordered S then R events (some equal timestamps), distinct candidates."""
    n = num_static + num_realtime
    profile = np.array([rng.integers(1, c) for c in PROFILE_CARDINALITIES], np.int64)
    gaps = rng.choice([0, 1, 5, 60, 3600, 86_400, 700_000], size=n)
    timestamps = (START_TS + np.cumsum(gaps)).astype(np.int64)
    context = UserContext(
        profile=profile,
        items=rng.integers(1, num_items + 1, size=n).astype(np.int64),
        timestamps=timestamps,
        ratings=rng.integers(1, 6, size=n).astype(np.int64),
        num_static=num_static,
    )
    candidates = rng.choice(np.arange(1, num_items + 1), size=num_candidates, replace=False).astype(np.int64)
    last = int(timestamps[-1]) if n else START_TS
    labels = rng.integers(0, 2, size=(num_candidates, num_tasks)).astype(np.float32)
    return FeatureRequest(context=context, candidates=candidates, request_ts=last + int(rng.integers(1, 10_000)),
                       labels=labels)


@pytest.fixture
def make_request() -> RequestBuilder:
    """`make_request(num_static, num_realtime, num_candidates, seed=0)` -> a random FeatureRequest."""

    def make(num_static: int, num_realtime: int, num_candidates: int, seed: int = 0) -> FeatureRequest:
        return build_request(np.random.default_rng(seed), num_static, num_realtime, num_candidates)

    return make



@pytest.fixture(scope="session")
def served_checkpoint(tmp_path_factory):
    """An mtgr-tiny checkpoint trained one epoch on SERVED_SPEC: what the tests that start servers serve."""
    from grinfer.data import load_dataset
    from grinfer.train.loop import TrainSettings
    from grinfer.train.run import train_model

    path = tmp_path_factory.mktemp("served") / "model"
    train_model(preset("mtgr-tiny"), load_dataset(SERVED_SPEC), SERVED_SPEC, TrainSettings(epochs=1, progress=False),
                path, validate=False)
    return path
