"""Two real servers on one checkpoint: one engine on the CPU, and two engines (`devices="cpu,cpu"`) behind
an EngineSet, each assembled by `build_server` as `grinfer serve` does and served over HTTP."""

from __future__ import annotations

import pytest
from multidevice_util import Served


@pytest.fixture(scope="package")
def servers(served_checkpoint, tmp_path_factory):
    """(one engine, two engines): both serving the same checkpoint on stores of their own."""
    one = Served(served_checkpoint, tmp_path_factory.mktemp("one"), None)
    two = Served(served_checkpoint, tmp_path_factory.mktemp("two"), "cpu,cpu")
    yield one, two
    two.close()
    one.close()
