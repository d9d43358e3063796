"""Private Redis and PostgreSQL servers that the fault tests start, kill, pause and stop on their own
ports (never the shared ones), and a real grinfer app over a store and a cache."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis
import torch

from grinfer.config import preset
from grinfer.data import generate_synthetic
from grinfer.engine import Engine
from grinfer.model import build_model
from grinfer.serving.app import AppState, create_app
from grinfer.serving.background import BackgroundServer, free_port
from grinfer.serving.metrics import Metrics
from grinfer.serving.service import RecommenderService
from grinfer.storage import open_cache, open_store
from grinfer.storage.importer import import_dataset

NUM_ITEMS = 60


def wait_until(predicate, timeout_s: float = 30.0, what: str = "condition") -> None:
    """Poll `predicate` every 50 ms until it is true; fail the test after `timeout_s`."""
    end = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > end:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


class PrivateRedis:
    """A redis-server child process on a free port, with no persistence."""

    def __init__(self) -> None:
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server is not installed: the Redis fault tests need their own server")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--daemonize", "no"], stdout=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_timeout=0.5)

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False
        wait_until(answers, what=f"redis-server on port {self.port}")
        client.close()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing answers (a hung server)."""
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.resume()
            self.kill()


class PrivatePostgres:
    """A PostgreSQL cluster made with initdb in a temporary directory, served on a free port (trust auth).

    As root the binaries run as the `postgres` user (PostgreSQL refuses to run as root)."""

    def __init__(self) -> None:
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not bins:
            pytest.skip("PostgreSQL server binaries (/usr/lib/postgresql/*/bin/initdb) are not installed")
        self.bin = Path(bins[-1]).parent
        self.root = Path(tempfile.mkdtemp(prefix="grinfer-pg-"))
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.root, "postgres", "postgres")
        self.data = self.root / "data"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync")
        self.start()

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run([*self.as_user, str(self.bin / tool), *args], check=True, stdout=subprocess.DEVNULL,
                       timeout=120)

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "log"), "-w", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def _processes(self) -> list[int]:
        """The postmaster and every process it started (backends, checkpointer, walwriter, ...)."""
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        pids, frontier = [postmaster], [postmaster]
        while frontier:
            parent = frontier.pop()
            for children in glob.glob(f"/proc/{parent}/task/*/children"):
                found = [int(pid) for pid in Path(children).read_text().split()]
                pids += found
                frontier += found
        return pids

    def pause(self) -> None:
        """SIGSTOP the whole cluster: connections stay open, nothing answers (a hung database)."""
        self._paused = self._processes()
        for pid in self._paused:
            os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        for pid in getattr(self, "_paused", []):
            os.kill(pid, signal.SIGCONT)
        self._paused = []

    def close(self) -> None:
        self.resume()
        if (self.data / "postmaster.pid").exists():
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


class App:
    """A real grinfer server (tiny MTGR on CPU) over the store and cache named by URL, on a free port."""

    def __init__(self, store_url: str, cache_url: str) -> None:
        torch.manual_seed(0)
        self.ds = generate_synthetic(num_users=12, num_items=NUM_ITEMS, mean_events=15, seed=0)
        cfg = preset("mtgr-tiny").with_vocab(num_items=NUM_ITEMS, num_year_buckets=19)
        self.store, self.cache = open_store(store_url), open_cache(cache_url)
        import_dataset(self.ds, self.store)
        self.engine = Engine(build_model(cfg).eval(), self.ds.catalog).start()
        self.service = RecommenderService(self.engine, self.ds.catalog, self.store, self.cache)
        self.metrics = Metrics(self.engine, "eager")
        self.server = BackgroundServer(create_app(AppState(self.service, self.metrics)))
        self.http = httpx.Client(base_url=self.server.start(), timeout=60)
        self.users = [str(u.user_id) for u in self.ds.users]

    def item(self, dense: int) -> int:
        return int(self.ds.catalog.raw_ids[dense])

    def rank(self, user: str) -> httpx.Response:
        candidates = [{"item": self.item(i)} for i in (1, 2, 3)]
        return self.http.post("/v1/rank", json={"user": user, "candidates": candidates})

    def append(self, user: str, key: str | None = None) -> httpx.Response:
        headers = {"Idempotency-Key": key} if key else {}
        return self.http.post("/v1/events", json={"user": user, "events": [{"item": self.item(4), "ts": 1_000}]},
                              headers=headers)

    def mixed_load(self, rounds: int = 3, clients: int = 4) -> list[httpx.Response]:
        """`clients` threads each sending `rounds` × (rank, recommend, events): every response, in order."""
        def client(c: int) -> list[httpx.Response]:
            out = []
            for r in range(rounds):
                user = self.users[(c + r) % len(self.users)]
                out.append(self.rank(user))
                out.append(self.http.post("/v1/recommend", json={"user": user, "k": 3}))
                out.append(self.append(user))
            return out
        with ThreadPoolExecutor(clients) as pool:
            return [r for rs in pool.map(client, range(clients)) for r in rs]

    def metric(self, name: str) -> float:
        """The value of an unlabelled metric on /metrics."""
        for line in self.http.get("/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"{name} is not on /metrics")

    def close(self) -> None:
        self.http.close()
        self.server.stop()
        self.engine.shutdown()
        self.cache.close()
        self.store.close()
