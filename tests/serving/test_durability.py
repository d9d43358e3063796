"""Nothing acknowledged is lost: events that POST /v1/events acknowledged before a `kill -9` of the
real server process are all there after a restart on the same store (SQLite and PostgreSQL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import httpx
import psycopg
import pytest

from grinfer.bench.served import wait_ready
from grinfer.data import load_dataset
from grinfer.serving.background import free_port
from grinfer.storage import open_store

SPEC = "synthetic:users=20,items=60,events=15,seed=0"
PG = "postgresql://postgres@127.0.0.1:5432/test"
SERVICES = os.environ.get("GRINFER_SKIP_SERVICES") != "1"
ACKS_BEFORE_KILL = 50
TS0 = 2_000_000_000  # later than every synthetic event, so ours are the users' newest



@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.skipif(
    not SERVICES, reason="GRINFER_SKIP_SERVICES=1: PostgreSQL tests skipped on request"))])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'grinfer.db'}"
        return
    schema = "t" + uuid.uuid4().hex[:10]
    yield f"{PG}?schema={schema}"
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


class ServerProcess:
    """`grinfer serve` as a child process, its output in a log file."""

    def __init__(self, model, store_url: str, log_path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "wb")  # closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "grinfer.cli", "serve",
             "--backend", "eager", "--model", str(model), "--store", store_url,
             "--port", str(self.port), "--grpc-port", "0", "--device", "cpu"],
            stdout=self.log, stderr=subprocess.STDOUT,
            env={k: v for k, v in os.environ.items() if not k.startswith("GRINFER_")})  # flags only

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        wait_ready(self.proc, self.url, timeout_s, lambda: f"its output:\n{self.output()}", poll_s=0.1)

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self.log.close()


class Poster(threading.Thread):
    """Posts one event per request, back to back, alternating users; records every acknowledged event."""

    def __init__(self, url: str, users: list[str], items: list[int]):
        super().__init__(daemon=True)
        self.url, self.users, self.items = url, users, items
        self.sent: list[tuple[str, int, int]] = []  # (user, item, ts) of every attempt
        self.acked: list[tuple[str, int, int]] = []
        self.failures = 0
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=5.0) as http:
            i = 0
            while not self.stop.is_set():
                event = (self.users[i % len(self.users)], self.items[i % len(self.items)], TS0 + i)
                self.sent.append(event)
                i += 1
                try:
                    r = http.post("/v1/events", json={"user": event[0], "events": [
                        {"item": event[1], "ts": event[2], "action": 1 + i % 5}]})
                except httpx.TransportError:
                    self.failures += 1
                    time.sleep(0.01)
                    continue
                if r.status_code == 200 and r.json()["appended"] == 1:
                    self.acked.append(event)


def _stored(store_url: str, user: str) -> set[tuple[int, int]]:
    """(catalogue item, ts) of all the user's events, read from the store itself."""
    store = open_store(store_url)
    try:
        raw_ids = store.load_catalog().raw_ids
        record = store.get_user(user)
        assert record is not None, f"user {user} is gone"
        return {(int(raw_ids[e.item]), e.ts) for e in record.static + record.realtime}
    finally:
        store.close()


def test_acknowledged_events_survive_kill_9(served_checkpoint, store_url, tmp_path):
    ds = load_dataset(SPEC)
    users = [str(ds.users[0].user_id), "durable-new-user"]  # an imported user and one the events create
    items = [int(x) for x in ds.catalog.raw_ids[1:]]
    servers: list[ServerProcess] = []
    poster = None
    try:
        first = ServerProcess(served_checkpoint, store_url, tmp_path / "first.log")
        servers.append(first)
        first.wait_ready()
        poster = Poster(first.url, users, items)
        poster.start()
        deadline = time.monotonic() + 30
        while len(poster.acked) < ACKS_BEFORE_KILL and time.monotonic() < deadline and poster.is_alive():
            time.sleep(0.005)
        assert len(poster.acked) >= ACKS_BEFORE_KILL, f"only {len(poster.acked)} acks:\n{first.output()}"
        os.kill(first.proc.pid, signal.SIGKILL)  # mid-stream: the poster keeps going
        first.proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while poster.failures < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        poster.stop.set()
        poster.join(timeout=10)
        assert poster.failures > 0  # posts after the kill failed, so the kill did land mid-stream
        acked = list(poster.acked)

        second = ServerProcess(served_checkpoint, store_url, tmp_path / "second.log")
        servers.append(second)
        second.wait_ready()
        sent = {(u, item, ts) for u, item, ts in poster.sent}
        for user in users:
            mine = sorted(((item, ts) for u, item, ts in acked if u == user), key=lambda e: e[1])
            stored = _stored(store_url, user)
            missing = [e for e in mine if e not in stored]
            assert not missing, f"{user}: {len(missing)} of {len(mine)} acknowledged events lost: {missing[:5]}"
            ours = {e for e in stored if e[1] >= TS0}
            assert ours <= {(item, ts) for u, item, ts in sent if u == user}  # nothing invented either
            r = httpx.get(f"{second.url}/v1/users/{user}", timeout=10)
            assert r.status_code == 200, r.text
            recent = {(e["item"], e["ts"]) for e in r.json()["recent"]}
            # one request was in flight at most, so the 19 newest acked are among the 20 most recent served
            assert set(mine[-19:]) <= recent, (mine[-19:], recent)
    finally:
        if poster is not None:
            poster.stop.set()
            poster.join(timeout=10)
        for server in servers:
            server.stop()
