"""A real server built by `build_server` (engines, store, service, metrics) on a background HTTP thread,
and a device fault injected into one engine."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import httpx

from grinfer.config import ServerConfig
from grinfer.serving.app import create_app
from grinfer.serving.background import BackgroundServer
from grinfer.serving.engine_set import fail_engine
from grinfer.serving.server import build_server


class Served:
    """`build_server` of the checkpoint on the CPU (devices: None = one engine), served on loopback."""

    def __init__(self, checkpoint: Path, home: Path, devices: str | None, **settings):
        cfg = ServerConfig(home=str(home), store=f"sqlite:///{home / 'grinfer.db'}", engine={"backend": "eager"},
                           grpc_port=0, devices=devices, **settings)
        self.server = build_server(cfg, checkpoint, "cpu")
        self.engine = self.server.engine.production  # the served version's engine (models.py's ModelSet)
        self.http_server = BackgroundServer(create_app(self.server.state))
        self.http = httpx.Client(base_url=self.http_server.start(), timeout=30, trust_env=False)

    def users(self) -> list[str]:
        return [str(u) for u in self.http.get("/v1/users", params={"limit": 1000}).json()["users"]]

    def rank(self, user: str, items: list[int]) -> httpx.Response:
        return self.http.post("/v1/rank", json={"user": user, "candidates": [{"item": i} for i in items]})

    def close(self) -> None:
        self.http.close()
        self.http_server.stop()
        self.server.close()


@contextmanager
def device_fault(engine):
    """Every step of `engine` fails, as on a lost GPU, until the block ends (engine_set.fail_engine)."""
    heal = fail_engine(engine)
    try:
        yield
    finally:
        heal()
