"""Front-end worker processes (`grinfer serve --workers N`): more CPUs for HTTP, one engine for the device.

Each worker is a spawned process serving the same REST app on the same port (SO_REUSEPORT: the kernel
spreads connections over the engine process's own listener and the workers'); it opens the store and
cache itself and sends engine work to the engine process (engine_link.py). An event posted through one
worker must be seen by the next request on any other: with the in-process cache (`memory://`) a worker's
TTL cache is off (TTL 0: only a shared cache, Redis, can invalidate across processes), and its store keeps
user records checked against the store's per-user revision on every read (`RevisionCheckedStore`).

Metrics: with workers, every process writes its counters and histograms under PROMETHEUS_MULTIPROC_DIR
and any process's `/metrics` adds them up (prometheus_client's multiprocess mode; set before the
first import of prometheus_client, see `metrics_dir_env`).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import socket
import threading
import time
from pathlib import Path

from grinfer.config import ServerConfig

log = logging.getLogger("grinfer.serve")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def metrics_dir_env(cfg: ServerConfig) -> dict[str, str]:
    """The environment that puts every process's metrics in one fresh folder (call before prometheus_client
    is imported; the folder is emptied: files of an earlier run would be counted again)."""
    folder = cfg.home_dir / "run" / f"metrics-{cfg.port}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return {MULTIPROC_ENV: str(folder)}


def shared_port_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket that the engine process and its workers all bind (SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(False)
    return sock


class Workers:
    """N spawned front-end processes; `stop()` asks them to drain (SIGTERM), then kills what is left."""

    def __init__(self, cfg: ServerConfig, engine_socket: Path):
        ctx = multiprocessing.get_context("spawn")  # never fork a process that holds CUDA state and threads
        self.processes = [ctx.Process(target=worker_main, args=(cfg.model_dump(), str(engine_socket), i),
                                      name=f"grinfer-worker-{i}") for i in range(cfg.workers)]
        for p in self.processes:
            p.start()
        log.info("%d front-end workers started (pids %s)", len(self.processes),
                 ", ".join(str(p.pid) for p in self.processes))

    def alive(self) -> int:
        return sum(p.is_alive() for p in self.processes)

    def stop(self, timeout_s: float = 30.0) -> None:
        for p in self.processes:
            if p.is_alive():
                p.terminate()
        for p in self.processes:
            p.join(timeout_s)
            if p.is_alive():
                p.kill()
                p.join()


def worker_main(cfg_fields: dict, engine_socket: str, index: int) -> None:
    """A worker's life: open storage, connect to the engine, serve REST on the shared port until SIGTERM."""
    import uvicorn
    from prometheus_client import multiprocess

    from grinfer.serving.app import create_app
    from grinfer.serving.engine_link import EngineClient
    from grinfer.serving.server import front_state
    from grinfer.storage import open_cache, open_store
    from grinfer.storage.checked import RevisionCheckedStore

    cfg = ServerConfig.model_validate(cfg_fields)
    if cfg.store is None:
        raise ValueError("store: a worker gets the engine process's resolved store URL, got none")
    logging.basicConfig(level=cfg.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s %(name)s[w{index}]: %(message)s")
    store, cache = RevisionCheckedStore(open_store(cfg.store)), open_cache(cfg.cache)
    engine = EngineClient(Path(engine_socket), workers=cfg.workers)  # ready once every worker listens
    try:
        catalog = store.load_catalog()
        if catalog is None:
            raise ValueError("store: no item catalogue (the engine process imports one before starting workers)")
        state = front_state(cfg, engine, catalog, store, cache, user_ttl_s=0.0 if cache.in_process else None,
                            process=f"worker-{index}")
        server = uvicorn.Server(uvicorn.Config(create_app(state), log_level=cfg.log_level,
                                               access_log=cfg.access_log, timeout_graceful_shutdown=30))
        threading.Thread(target=_say_listening, args=(server, engine, index), daemon=True).start()
        server.run(sockets=[shared_port_socket(cfg.host, cfg.port)])
    finally:
        engine.close()
        cache.close()
        store.close()
        if os.environ.get(MULTIPROC_ENV):
            multiprocess.mark_process_dead(os.getpid())


def _say_listening(server, engine, index: int, timeout_s: float = 300.0) -> None:
    """Tell the engine process once this worker's uvicorn listens (it then leaves the port to the workers)."""
    deadline = time.monotonic() + timeout_s
    while not server.started and not server.should_exit and time.monotonic() < deadline:
        time.sleep(0.05)
    if server.started:
        engine.call("listening", index)
