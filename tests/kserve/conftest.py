"""One live grinfer (REST + gRPC over one service, tiny MTGR, SQLite) for the KServe v2 tests."""

from __future__ import annotations

import pytest
from reliability.live_stack import LiveStack


@pytest.fixture(scope="session")
def live(tmp_path_factory):
    stack = LiveStack(tmp_path_factory.mktemp("kserve") / "db.sqlite")
    yield stack
    stack.close()
