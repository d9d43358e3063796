"""The test model's cached-step AOTInductor package, shared by the aoti backend's tests."""

from __future__ import annotations

import pytest
from test_backends import compiler_problem

from grinfer.export.artifacts import Limits

AOTI_BLOCK_SIZE = 4
AOTI_LIMITS = Limits(batch=8, static=64, realtime=16, candidates=64)  # small ranges: steps past them run eager


def aoti_package(model, request: pytest.FixtureRequest) -> str:
    """The package's path: compiled once (about a minute on 2 cores) and kept in pytest's cache directory
    across sessions, keyed by the model's fingerprint as the server keeps its exports."""
    if problem := compiler_problem():
        pytest.skip(problem)
    from grinfer.export.cache import step_package

    return str(step_package(model, AOTI_BLOCK_SIZE, request.config.cache.mkdir("aoti-packages"), AOTI_LIMITS))
