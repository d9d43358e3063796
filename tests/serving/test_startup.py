"""Start-up: the REST port answers while the server prepares, warm-up runs before ready, failures exit cleanly."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import httpx
import pytest

from grinfer.config import ServerConfig
from grinfer.serving.background import free_port
from grinfer.serving.server import Launch


def wait_for(predicate, timeout: float = 60.0, state=lambda: ""):
    """Poll `predicate` until true (transport errors count as false); on timeout, say `state()`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"not true within {timeout} s; {state()}")


def test_port_answers_while_preparing_and_opens_when_ready(served_checkpoint, tmp_path):
    release = threading.Event()

    def train(report):  # stands in for the demo models' training: blocks until the test lets it go
        report("training demo models (ranking)", 0.5)
        assert release.wait(60)

    port = free_port()
    cfg = ServerConfig(port=port, grpc_port=0, store=f"sqlite:///{tmp_path / 's.db'}", log_level="warning")
    launch = Launch(cfg, served_checkpoint, "cpu", train)
    thread = threading.Thread(target=launch.serve, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(f"{url}/healthz", timeout=10).status_code == 200, 180, launch.prep.snapshot)
        ready = httpx.get(f"{url}/readyz", timeout=10)
        assert ready.status_code == 503
        body = ready.json()
        assert body["status"] == "training demo models (ranking)" and body["progress"] == pytest.approx(0.4)
        rank = httpx.post(f"{url}/v1/rank", json={"user": "1", "candidates": [{"item": 1}]}, timeout=10)
        assert rank.status_code == 503 and "not ready" in rank.json()["error"] and rank.headers["retry-after"]
        page = httpx.get(url, timeout=10)
        assert page.status_code == 200 and "grinfer is starting" in page.text
        release.set()
        wait_for(lambda: httpx.get(f"{url}/readyz", timeout=10).status_code == 200, 180, launch.prep.snapshot)
        stats = launch.parts["server"].engine.stats()
        assert stats["steps"] > 0  # the warm-up ran requests through the engine before ready
        assert stats["kv_cache"]["misses"] == 0  # and its cache lookups are not counted as traffic
        r = httpx.post(f"{url}/v1/recommend", json={"user": "1", "k": 3}, timeout=30)
        assert r.status_code == 200 and len(r.json()["items"]) == 3
    finally:
        release.set()
        launch.web.should_exit = True
        thread.join(30)
    assert not launch.parts["server"].engine.running  # the lifespan's shutdown closed the server


def test_a_preparation_that_fails_exits_with_one_line(tmp_path):
    port = free_port()
    proc = subprocess.run([sys.executable, "-m", "grinfer.cli", "serve",
                           "--backend", "eager", "--model", str(tmp_path / "none"),
                           "--port", str(port), "--grpc-port", "0", "--store", f"sqlite:///{tmp_path / 's.db'}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "holds no checkpoint" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_unreachable_store_is_one_line_not_a_traceback(served_checkpoint, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "grinfer.cli", "serve",
                           "--backend", "eager", "--model", str(served_checkpoint), "--port",
                           str(free_port()), "--grpc-port", "0", "--store", "postgresql://nobody@127.0.0.1:1/x"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith("error: store: cannot open it") and "refused" in errors[0]
