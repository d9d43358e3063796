"""The hand-over of the REST port from the engine process to its workers, over the real engine link: a worker
is not ready until every worker has said it listens and the engine process has handled that (opened its app,
left the port), so no client that saw a worker's /readyz 200 can then meet the engine process's start-up 503."""

from __future__ import annotations

import threading
import time

import pytest

from grinfer.config import EngineConfig, preset
from grinfer.data import generate_synthetic
from grinfer.engine import Engine
from grinfer.model import build_model
from grinfer.serving.engine_link import EngineClient, EngineHost

DS = generate_synthetic(num_users=2, num_items=20, mean_events=5, seed=0)


@pytest.fixture(scope="module")
def engine():
    model = build_model(preset("mtgr-tiny").with_vocab(num_items=20, num_year_buckets=19)).eval()
    engine = Engine(model, DS.catalog, EngineConfig())
    engine.start()
    yield engine
    engine.shutdown()


def test_workers_are_ready_only_once_every_worker_listens_and_the_engine_process_handled_it(engine, tmp_path):
    handling, release = threading.Event(), threading.Event()
    handled: list[int] = []

    def on_listening(index: int) -> None:  # the engine process's side: the last one opens its app, leaves the port
        if index == 1:
            handling.set()
            release.wait(30)
        handled.append(index)

    host = EngineHost(engine, tmp_path / "engine.sock", on_listening=on_listening)
    clients = [EngineClient(tmp_path / "engine.sock", workers=2) for _ in range(2)]
    try:
        assert clients[0].health() == "starting the front-end workers (0 of 2 listen)"
        clients[0].call("listening", 0).result(30)
        wait_until(lambda: handled == [0])
        assert clients[1].health() == "starting the front-end workers (1 of 2 listen)"
        clients[1].call("listening", 1)
        assert handling.wait(30)  # the engine process is still handing over: not ready yet
        assert clients[0].health() == "starting the front-end workers (1 of 2 listen)"
        release.set()
        wait_until(lambda: handled == [0, 1])
        wait_until(lambda: clients[0].health() is None)
        assert clients[1].health() is None
        alone = EngineClient(tmp_path / "engine.sock")  # a client that waits for no workers: the engine's health
        assert alone.health() is None
        alone.close()
    finally:
        release.set()
        for client in clients:
            client.close()
        host.close()


def wait_until(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)
