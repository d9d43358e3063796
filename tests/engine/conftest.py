"""Engine-test fixtures: one mtgr-tiny model with fixed weights, shared by every engine in a test."""

from __future__ import annotations

import pytest
from engine_util import fixed_model

from grinfer.config import ModelConfig
from grinfer.model.mtgr import MTGR


@pytest.fixture(scope="session")
def model(mtgr_cfg: ModelConfig) -> MTGR:
    """mtgr-tiny (2 layers, d 32, 2 heads) over the test catalogue."""
    return fixed_model(mtgr_cfg)
