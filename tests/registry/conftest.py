"""Fixtures for the registry tests: model directories with seeded weights (no training) for the served
dataset, and a registry on SQLite or on PostgreSQL (a schema of its own, dropped afterwards)."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from model_util import SERVED_SPEC, seeded_model
from psycopg import sql

from grinfer.config import preset
from grinfer.data import load_dataset
from grinfer.model.checkpoint import save_checkpoint
from grinfer.registry import Registry, open_registry
from grinfer.train.run import config_for

POSTGRES_URL = os.environ.get("GRINFER_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
MakeModel = Callable[[int], Path]


@pytest.fixture(scope="session")
def make_model_dir(tmp_path_factory) -> MakeModel:
    """`make(seed)`: an mtgr-tiny checkpoint for SERVED_SPEC with weights seeded by `seed` and a metrics.json."""
    cfg = config_for(preset("mtgr-tiny"), load_dataset(SERVED_SPEC))
    root = tmp_path_factory.mktemp("models")

    def make(seed: int) -> Path:
        path = root / f"model-{seed}-{uuid.uuid4().hex[:6]}"
        save_checkpoint(seeded_model(cfg, seed), path, extra={"training": {"data": SERVED_SPEC}})
        (path / "metrics.json").write_text(json.dumps({"seed": seed, "ranking": {"ctr": {"auc": 0.5}}}))
        return path

    return make


@pytest.fixture(scope="session")
def postgres_url() -> str:
    try:
        with psycopg.connect(POSTGRES_URL, connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        if os.environ.get("GRINFER_SKIP_SERVICES") == "1":
            pytest.skip(f"PostgreSQL is unreachable at {POSTGRES_URL}: {exc} (GRINFER_SKIP_SERVICES=1)")
        pytest.fail(f"PostgreSQL is unreachable at {POSTGRES_URL}: {exc}", pytrace=False)
    return POSTGRES_URL


@pytest.fixture
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh store URL: SQLite, or PostgreSQL with a schema `reg_<random>` dropped afterwards."""
    if getattr(request, "param", "sqlite") == "sqlite":
        yield f"sqlite://{tmp_path}/store.db"
        return
    base = request.getfixturevalue("postgres_url")
    schema = f"reg_{uuid.uuid4().hex[:16]}"
    yield f"{base}?schema={schema}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture
def registry(store_url: str) -> Iterator[Registry]:
    reg = open_registry(store_url)
    yield reg
    reg.close()
