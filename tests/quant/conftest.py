"""Low-precision test fixtures: a fresh seeded mtgr-tiny per test (dense quantisation changes a model in place)."""

from __future__ import annotations

import pytest
from model_util import seeded_model

from grinfer.config import ModelConfig
from grinfer.model.mtgr import MTGR


@pytest.fixture
def model(mtgr_cfg: ModelConfig) -> MTGR:
    """mtgr-tiny (2 layers, d 32, 2 heads) over the test catalogue, seeded weights."""
    return seeded_model(mtgr_cfg)
