"""`grinfer serve` as a child process for the serving benchmarks: start, wait for /readyz, stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from grinfer.serving.background import free_port


class ServerFailed(RuntimeError):
    """The server exited or did not become ready in time; the message holds the tail of its log."""


def wait_ready(proc: subprocess.Popen, url: str, timeout_s: float, describe: Callable[[], str] = lambda: "",
               poll_s: float = 0.25) -> float:
    """Seconds until `url`/readyz answered 200 while `proc` (the server) runs; ServerFailed, its message ending
    with `describe()` (e.g. the server's log), if the process exits or `timeout_s` passes."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if proc.poll() is not None:
            raise ServerFailed(f"the server exited with code {proc.returncode} before it was ready; {describe()}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2.0, trust_env=False).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:  # not listening yet, or busy preparing
            pass
        time.sleep(poll_s)
    raise ServerFailed(f"the server was not ready after {timeout_s:g} s; {describe()}")


class ServedProcess:
    """One `python -m grinfer.cli serve` on loopback (REST only), its output in `log_path`."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "grinfer.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                 "--grpc-port", "0", *args],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=dict(os.environ) if env is None else env)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def wait_ready(self, timeout_s: float, poll_s: float = 0.25) -> float:
        """Seconds until GET /readyz answered 200; ServerFailed if the process exits or `timeout_s` passes."""
        return wait_ready(self.proc, self.url, timeout_s,
                          lambda: f"its log ({self.log_path}) ends:\n{self.log_tail()}", poll_s)

    def stop(self, grace_s: float = 45.0) -> int:
        """SIGTERM (the server drains), then SIGKILL after `grace_s`; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        return self.proc.returncode


@contextmanager
def served(args: list[str], out: Path, ready_timeout_s: float, env: dict[str, str] | None = None
           ) -> Iterator[ServedProcess]:
    """A ready `grinfer serve ARGS` (its log in out/server.log) for the block; stopped after it."""
    out.mkdir(parents=True, exist_ok=True)
    server = ServedProcess(args, out / "server.log", env=env)
    try:
        server.wait_ready(ready_timeout_s)
        yield server
    finally:
        server.stop()


def report_main(name: str, run: Callable[[], dict], table: Callable[[dict], str], files: list[Path]) -> int:
    """A served benchmark's main: run it, print its table and the files it wrote (exit 0), or the server's
    failure as one message (exit 1)."""
    try:
        report = run()
    except ServerFailed as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 1
    print(table(report))
    print(f"wrote {' and '.join(str(f) for f in files)}")
    return 0
