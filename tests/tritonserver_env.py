"""A separate, cached virtual environment with NVIDIA Triton Inference Server and its client, for tests.

`nvidia-pytriton`'s wheel carries a `tritonserver` binary with the Python backend (CPU works);
`tritonclient` speaks HTTP and gRPC to it. Neither may go into the project's .venv: tritonclient 2.73
needs protobuf < 7, grinfer's committed gRPC stubs need protobuf >= 7.35. So the environment is built
once (under GRINFER_TRITON_ENV, default ~/.cache/grinfer/tritonserver-env-<key of the package list>)
by scripts/triton_env.sh (what the README tells users to run): the CPU torch, numpy < 2 (the Python
backend stub needs it) and what grinfer's Python-backend models import; grinfer comes from this checkout.

    env = triton_env()                  # built on first use (about a minute), then at once; tests: triton_env_or_skip()
    out = env.run_client(SCRIPT, {...})  # a Python client script in that environment, JSON in / out
    with TritonServer(env, repo) as srv: # tritonserver on free loopback ports, ready, stopped on exit
        srv.http_url, srv.grpc_url
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from grinfer.serving.background import free_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "triton_env.sh"  # builds the environment (what the README tells users to run)
BUILD_TIMEOUT_S = 1200


class TritonEnvUnavailable(RuntimeError):
    """The Triton environment cannot be built here (the message says why)."""


@dataclass(frozen=True)
class TritonEnv:
    """The environment's interpreter, its `tritonserver` (a wrapper that gives the Python backend) and the
    variables to run them with."""

    python: Path
    tritonserver: Path
    env: dict

    def run_client(self, script: str, payload: object = None, timeout: float = 120.0) -> object:
        """Run `script` (Python source) in the environment: `payload` as JSON on stdin, its stdout parsed as JSON."""
        proc = subprocess.run([str(self.python), "-c", script], input=json.dumps(payload), capture_output=True,
                              text=True, timeout=timeout, env=self.env)
        if proc.returncode != 0:
            raise RuntimeError(f"client script failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(proc.stdout)


def env_dir() -> Path:
    """Where the environment lives: keyed by the build script (its package list) and this interpreter's version."""
    key = hashlib.sha256(SCRIPT.read_bytes() + repr(sys.version_info[:2]).encode()).hexdigest()[:12]
    default = Path.home() / ".cache" / "grinfer" / f"tritonserver-env-{key}"
    return Path(os.environ.get("GRINFER_TRITON_ENV", default))


def triton_env() -> TritonEnv:
    """The environment, built on first use (under a file lock, so concurrent test processes build it once)."""
    path = env_dir()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f"{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _build(path)  # returns at once when the script's stamp says the environment is complete
    return _describe(path)


def triton_env_or_skip() -> TritonEnv:
    """`triton_env()`, or skip the calling test with the reason when the environment cannot be built here."""
    import pytest

    try:
        return triton_env()
    except TritonEnvUnavailable as exc:
        pytest.skip(str(exc))


def _base_python() -> str:
    """A real interpreter (not a venv's) of this Python version: the stub embeds that version's libpython."""
    return getattr(sys, "_base_executable", None) or sys.executable


def _build(path: Path) -> None:
    try:
        subprocess.run(["bash", str(SCRIPT), str(path)], check=True, capture_output=True, text=True,
                       timeout=BUILD_TIMEOUT_S, env={**os.environ, "PYTHON": _base_python()})
    except subprocess.CalledProcessError as exc:
        tail = (exc.stderr or exc.stdout or "").strip().splitlines()[-3:]
        raise TritonEnvUnavailable(f"cannot build the Triton environment at {path} ({SCRIPT.name}): "
                                   f"{' | '.join(tail)}") from None
    except subprocess.TimeoutExpired:
        raise TritonEnvUnavailable(f"building the Triton environment took over {BUILD_TIMEOUT_S} s") from None


def _describe(path: Path) -> TritonEnv:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update({
        "PYTHONPATH": str(ROOT),  # grinfer from this checkout (the cached environment may have been built by another)
        "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1"),
    })
    return TritonEnv(python=path / "bin" / "python", tritonserver=path / "bin" / "tritonserver", env=env)


class TritonServer:
    """`tritonserver` serving a model repository on free loopback ports; ready on enter, stopped on exit."""

    def __init__(self, env: TritonEnv, repository: Path, log_path: Path, ready_timeout: float = 180.0,
                 extra_args: tuple[str, ...] = ()):
        self.env, self.repository, self.log_path, self.ready_timeout = env, repository, log_path, ready_timeout
        self.extra_args = extra_args
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def __enter__(self) -> TritonServer:
        args = [str(self.env.tritonserver), "--model-repository", str(self.repository),
                "--http-address", "127.0.0.1", "--http-port", str(self.http_port),
                "--grpc-address", "127.0.0.1", "--grpc-port", str(self.grpc_port),
                "--metrics-address", "127.0.0.1", "--metrics-port", str(self.metrics_port),
                "--allow-gpu-metrics", "false", "--exit-on-error", "true", *self.extra_args]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=self.env.env,
                                     start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tritonserver exited ({self.proc.returncode}) before ready:\n{self.log_tail()}")
            if self.ready():
                return
            time.sleep(0.5)
        raise TimeoutError(f"tritonserver not ready after {self.ready_timeout} s:\n{self.log_tail()}")

    def ready(self) -> bool:
        """Whether GET /v2/health/ready answers 200."""
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def log_tail(self, chars: int = 6000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(timeout=10)
        self._log.close()
