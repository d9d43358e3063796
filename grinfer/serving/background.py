"""Run an ASGI app with uvicorn on a background thread (tests, benchmarks, notebooks)."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import uvicorn


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class BackgroundServer:
    """`with BackgroundServer(app) as url:` serves `app` on 127.0.0.1 until the block ends."""

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None, startup_timeout: float = 30.0):
        self.host, self.port = host, port or free_port(host)
        self.server = uvicorn.Server(uvicorn.Config(app, host=self.host, port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="grinfer-http", daemon=True)
        self.startup_timeout = startup_timeout

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200:
                    return self.url
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server on {self.url} did not start within {self.startup_timeout} s")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
