"""Helpers of the registry tests (a uniquely named module: `from conftest import` is ambiguous)."""

from __future__ import annotations

import pytest

BOTH_STORES = pytest.mark.parametrize("store_url", ["sqlite", "postgresql"], indirect=True)
