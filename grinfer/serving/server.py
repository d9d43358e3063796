"""Assemble and run the server: checkpoint + store + cache -> engine -> service -> REST (+ gRPC)."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from grinfer.config import EngineConfig, ServerConfig
from grinfer.data.types import ItemCatalog
from grinfer.model.checkpoint import load_checkpoint, read_checkpoint_meta
from grinfer.model.hstu import HSTURetrieval
from grinfer.model.mtgr import MTGR
from grinfer.model.quantize import DENSE
from grinfer.model.quantize_dense import check_dense
from grinfer.serving.app import AppState, create_app
from grinfer.serving.engine_link import EngineHost
from grinfer.serving.engine_set import build_engines, check_devices, members
from grinfer.serving.fleet import join_fleet
from grinfer.serving.metrics import Metrics
from grinfer.serving.models import ModelSet, kv_share
from grinfer.serving.service import RecommenderService, ServiceSettings
from grinfer.serving.startup import Preparation, StartupGate
from grinfer.serving.versions import (
    RegistryWatch,
    serving_plan,
    verified_dir,
    version_loader,
    version_settings,
    warm_all,
)
from grinfer.serving.workers import Workers, shared_port_socket
from grinfer.storage import Store, open_cache, open_store
from grinfer.storage.base import FeatureCache

log = logging.getLogger("grinfer.serve")
RANKING_DIR, RETRIEVAL_DIR = "ranking", "retrieval"
TrainModels = Callable[[Callable[[str, float], None]], object]  # train(report(status, fraction done))


class StartupError(RuntimeError):
    """The server cannot start with this configuration (message says why and what to do)."""


@dataclass
class Server:
    """Everything a running server holds; `close()` releases it in order."""

    state: AppState
    engine: ModelSet  # the served versions (one, unless the registry's plan has A/B arms or a shadow)
    store: Store
    cache: FeatureCache
    leave_fleet: Callable[[], None] = lambda: None  # stops the roll announcements' listener (fleet.py)
    watch: RegistryWatch | None = None  # registry mode: applies promotions and experiments (versions.py)

    def close(self) -> None:
        self.state.draining = True
        self.leave_fleet()
        if self.watch is not None:
            self.watch.close()
        self.engine.shutdown(drain=True)
        self.cache.close()
        self.store.close()


def model_dirs(path: Path) -> tuple[Path, Path | None]:
    """(ranking checkpoint, retrieval checkpoint or None) of a model directory."""
    if (path / RANKING_DIR / "config.json").is_file():
        retrieval = path / RETRIEVAL_DIR
        return path / RANKING_DIR, retrieval if (retrieval / "config.json").is_file() else None
    if (path / "config.json").is_file():
        return path, None
    raise StartupError(f"model: {path} holds no checkpoint (config.json, or ranking/ and retrieval/)")


def resolve_catalog(store, data_spec: str | None, num_items: int) -> ItemCatalog:
    """The store's catalogue; an empty store is first filled with the dataset the model was trained on."""
    catalog = store.load_catalog()
    if catalog is None:
        if data_spec is None:
            raise StartupError("store: it holds no item catalogue and the model records no training dataset; load "
                               "one with `grinfer import-movielens DIR --store URL` and serve with the same --store")
        from grinfer.data import load_dataset
        from grinfer.storage.importer import import_dataset

        log.info("empty store: importing %s", data_spec)
        ds = load_dataset(data_spec)
        try:
            import_dataset(ds, store)
        except Exception as exc:  # replicas of a fleet starting together: another one's import got there first
            if store.load_catalog() is None or not store.count_users():
                raise
            log.info("store: another server imported %s meanwhile (%s: %s); using theirs", data_spec,
                     type(exc).__name__, str(exc).splitlines()[0])
        catalog = ds.catalog
    if catalog.num_items != num_items:
        raise StartupError(f"store: its catalogue has {catalog.num_items} items but the model was trained on "
                           f"{num_items}; serve a model trained on this catalogue, or leave --store (GRINFER_STORE) "
                           "unset to use the store kept for the model's training dataset under GRINFER_HOME")
    return catalog


def _open(setting: str, opener, url: str | None):
    """open_store / open_cache with any failure (unreachable server, bad URL) as one StartupError line."""
    if url is None:
        raise StartupError(f"{setting}: unset (ServerConfig.with_store_for fills in the default)")
    try:
        return opener(url)
    except Exception as exc:
        raise StartupError(f"{setting}: cannot open it ({type(exc).__name__}: {str(exc).strip().splitlines()[0]})") \
            from None


def load_models(model_path: Path) -> tuple[Path, Path | None, MTGR, HSTURetrieval | None]:
    """(ranking dir, retrieval dir or None, ranking model, retrieval model or None) of a model directory,
    loaded on the CPU and checked to belong together."""
    ranking_dir, retrieval_dir = model_dirs(model_path)
    ranker = load_checkpoint(ranking_dir, map_location="cpu")
    if not isinstance(ranker, MTGR):
        raise StartupError(f"model: {ranking_dir} is a {ranker.cfg.kind} model; ranking needs an mtgr checkpoint")
    retriever = load_checkpoint(retrieval_dir, map_location="cpu") if retrieval_dir else None
    if retriever is not None and not isinstance(retriever, HSTURetrieval):
        raise StartupError(f"model: {retrieval_dir} is a {retriever.cfg.kind} model; retrieval needs an hstu "
                           "checkpoint")
    if retriever is not None and retriever.cfg.num_items != ranker.cfg.num_items:
        raise StartupError(f"model: {retrieval_dir} scores {retriever.cfg.num_items} items but {ranking_dir} "
                           f"{ranker.cfg.num_items}; retrieval needs the ranking model's catalogue (an imported "
                           "checkpoint: grinfer import-checkpoint --data <the ranking model's dataset>)")
    return ranking_dir, retrieval_dir, ranker, retriever


def build_server(cfg: ServerConfig, model_path: Path, device: str) -> Server:
    """Load models, open storage, start the engine; returns the assembled server (not yet listening)."""
    ranking_dir, retrieval_dir, ranker, retriever = load_models(model_path)
    store = _open("store", open_store, cfg.store)
    cache = _open("cache", open_cache, cfg.cache)
    data_spec = read_checkpoint_meta(ranking_dir).get("training", {}).get("data")
    catalog = resolve_catalog(store, data_spec, ranker.cfg.num_items)
    store.register_model(ranker.cfg.name, str(model_path.resolve()), {"ranking": str(ranking_dir),
                                                                       "retrieval": str(retrieval_dir or "")})
    devices = cfg.device_list(device)  # one engine per device (engine_set.py)
    dense = cfg.engine.dense or read_checkpoint_meta(ranking_dir).get(DENSE, "none")
    backend = cfg.engine.backend
    # what the server decides beside the engine's settings as given
    decided = {"backend": "eager" if backend == "auto" else backend, "dense": dense, "device": devices[0],
               "dtype": "bfloat16" if devices[0].startswith("cuda") else "float32",
               "disk_cache_dir": str(cfg.home_dir / "kv"),
               "onnx_path": onnx_export(ranking_dir, cfg) if backend == "onnx" else None,
               "aoti_path": aoti_export(ranker, ranking_dir, cfg) if backend == "aoti" else None}
    try:
        check_devices(devices)
        check_dense(dense, devices[0])
        engine_cfg = cfg.engine.resolved(**decided)
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    log.info("%s; torch %s", cfg.describe(",".join(devices), {"ranking": ranking_dir, "retrieval": retrieval_dir}),
             torch.__version__)
    probes = []
    if backend == "auto":
        engine_cfg, probes = choose_backend(ranker, catalog, engine_cfg, ranking_dir, cfg)
    plan, registry = serving_plan(cfg.model_name, store, model_path)  # the registry's versions, or MODEL alone
    split = cfg.kv_split if registry is not None else 0.0

    def build(ranking_dir: Path, ranker: MTGR, retriever: HSTURetrieval | None, share: float, key: str):
        """One version's engine (one per device), as the first: its backend, its probes, a KV share."""
        settings = version_settings(engine_cfg, share, key)
        if engine_cfg.onnx_path:
            settings = settings.model_copy(update={"onnx_path": onnx_export(ranking_dir, cfg)})
        engine = build_engines(ranker, catalog, settings, devices, retriever=retriever)
        for member in members(engine):  # auto probes the first device; the others run the backend it chose
            member.probes = [p.as_dict() for p in probes]
        return engine

    def build_version(path: Path, share: float, key: str):  # another version (model set swaps)
        ranking_dir, _, ranker, retriever = load_models(path)
        if ranker.cfg.num_items != catalog.num_items:
            raise StartupError(f"model: {path} scores {ranker.cfg.num_items} items, the catalogue has "
                               f"{catalog.num_items}")
        return build(ranking_dir, ranker, retriever, share, key)

    first = plan.production.key
    engines = {first: build(ranking_dir, ranker, retriever, kv_share(plan, first, split), first)}
    engines.update({key: build_version(verified_dir(v), kv_share(plan, key, split), key)
                    for key, v in plan.versions().items() if key != first})
    engine = ModelSet(plan, engines, catalog, loader=version_loader(build_version) if registry else None,
                      kv_split=split, consistency_fraction=cfg.consistency_sample)
    # with workers, no process may keep user records that another process's events have made stale
    state = front_state(cfg, engine, catalog, store, cache, user_ttl_s=0.0 if cfg.workers and cache.in_process
                        else None)
    engine.on_step = state.metrics.on_step
    engine.start()
    server = Server(state, engine, store, cache, join_fleet(state.service, engine))
    if registry is not None and cfg.model_name is not None:
        server.watch = RegistryWatch(registry, cfg.model_name, engine, cfg.registry_poll_s)
        state.apply_registry = server.watch.check
    return server


def onnx_export(ranking_dir: Path, cfg: ServerConfig) -> str:
    """The ranking checkpoint's ONNX graph, exported (and checked) on first use and kept under
    GRINFER_HOME/exports, keyed by the checkpoint's path and modification time."""
    from grinfer.config import dataset_key
    from grinfer.export.export import export_checkpoint

    weights = max(p.stat().st_mtime_ns for p in ranking_dir.iterdir())
    path = cfg.home_dir / "exports" / f"{dataset_key(str(ranking_dir))}-{weights}" / "ranking.onnx"
    if not path.exists():
        log.info("exporting %s to ONNX (%s) for the onnx backend", ranking_dir, path)
        export_checkpoint(ranking_dir, path, "onnx", progress=False)
    return str(path)


def aoti_export(ranker, ranking_dir: Path, cfg: ServerConfig, wait: bool = True) -> str | None:
    """The ranking model's cached-step AOTInductor package (for the engine's default page size), exported
    and checked on first use and kept under GRINFER_HOME/exports/aoti keyed by the model's fingerprint;
    without `wait`, None while a first export runs in a background process (for the next start)."""
    from grinfer.export.cache import step_package, step_package_in_background

    block_size, root = cfg.engine.block_size, cfg.home_dir / "exports" / "aoti"
    path = step_package(ranker, block_size, root) if wait else \
        step_package_in_background(ranker, ranking_dir, block_size, root)
    return None if path is None else str(path)


def choose_backend(ranker, catalog: ItemCatalog, engine_cfg: EngineConfig, ranking_dir: Path, cfg: ServerConfig):
    """`--backend auto`: probe the device's backends; the config with the fastest healthy one, and the probes."""
    from grinfer.engine.probe import available_backends, choose, format_probes, probe_backends

    names = available_backends(torch.device(engine_cfg.device))
    if "onnx" in names:
        engine_cfg = engine_cfg.model_copy(update={"onnx_path": onnx_export(ranking_dir, cfg)})
    skipped = {}
    if "aoti" in names:  # a first export takes minutes on a CPU: it serves from the next start
        engine_cfg = engine_cfg.model_copy(update={"aoti_path": aoti_export(ranker, ranking_dir, cfg, wait=False)})
        if engine_cfg.aoti_path is None:
            skipped["aoti"] = "its package is being exported in the background, for the next start"
    log.info("backend auto: probing %s", ", ".join(names))
    probes = probe_backends(ranker, catalog, engine_cfg, names, skipped=skipped)
    chosen = choose(probes)
    log.info("backend auto chose %s:\n%s", chosen.backend, format_probes(probes, chosen.backend))
    return engine_cfg.model_copy(update={"backend": chosen.backend}), probes


def front_state(cfg: ServerConfig, engine, catalog: ItemCatalog, store, cache, user_ttl_s: float | None = None,
                process: str = "engine") -> AppState:
    """What the REST/gRPC adapters need over an engine (in this process, or an EngineClient in a worker)."""
    ttl = cfg.user_ttl_s if user_ttl_s is None else user_ttl_s
    target = cfg.latency_target_ms / 1e3 if cfg.latency_target_ms else None
    settings = ServiceSettings(user_ttl_s=ttl, latency_target_s=target, replica=cfg.replica_name)
    service = RecommenderService(engine, catalog, store, cache, settings, model_name=engine.model_config.name)
    setting = cfg.engine.backend
    backend = engine.stats()["strategy"]["primary"] if setting == "auto" else setting
    return AppState(service, Metrics(engine, backend), api_key=cfg.api_key, max_body_bytes=cfg.max_body_bytes,
                    process=process, backend_setting=setting)


def run(cfg: ServerConfig, model_path: Path, device: str, train_models: TrainModels | None = None) -> None:
    """Serve REST (and gRPC when grpc_port > 0) until SIGINT/SIGTERM; in-flight requests drain first.

    The REST port answers at once (`/healthz` 200, `/readyz` 503 with the start-up's status and progress)
    while a thread prepares the server (see `Launch`). A preparation that fails stops the server and
    raises StartupError with its message."""
    launch = Launch(cfg, model_path, device, train_models)
    launch.serve()
    if launch.prep.error is not None:
        raise StartupError(launch.prep.error)


class Launch:
    """A server being started: uvicorn serving the start-up gate, and the thread preparing the real app.

    Preparation: models trained first when `train_models` is given (the demo models on a first start; it
    reports (status, fraction done) as it goes), models loaded, storage opened, warm-up (compiles, CUDA
    graphs), gRPC started; then the gate opens onto the REST app and, with `cfg.workers`, the engine is
    offered on a Unix socket and the front-end workers start on the same port (workers.py)."""

    def __init__(self, cfg: ServerConfig, model_path: Path, device: str, train_models: TrainModels | None = None):
        import uvicorn

        self.cfg, self.model_path, self.device, self.train_models = cfg, model_path, device, train_models
        # the engine thread gives up the GIL at every device wait and must win it back from the HTTP and link
        # threads: a 1 ms switch interval instead of Python's 5 bounds that wait
        sys.setswitchinterval(0.001)
        self.prep = Preparation()
        self.parts: dict = {}  # what the preparing thread built, for the shutdown hook
        self._listening: set[int] = set()  # workers serving the shared port
        self.gate = StartupGate(self.prep, on_shutdown=self.close)
        self.web = uvicorn.Server(uvicorn.Config(self.gate, host=cfg.host, port=cfg.port, log_level=cfg.log_level,
                                                 access_log=cfg.access_log, timeout_graceful_shutdown=30))
        # with workers, the port is shared (SO_REUSEPORT) by this process and theirs
        self.sockets = [shared_port_socket(cfg.host, cfg.port)] if cfg.workers else None
        log.info("listening on http://%s:%d; preparing: %s", cfg.host, cfg.port, _plan(model_path, train_models))
        threading.Thread(target=self._prepare, name="grinfer-startup", daemon=True).start()

    def serve(self) -> None:
        """Run uvicorn until SIGINT/SIGTERM (or a failed preparation)."""
        self.web.run(sockets=self.sockets)

    @property
    def engine_socket(self) -> Path:
        return self.cfg.home_dir / "run" / f"engine-{self.cfg.port}.sock"

    def close(self) -> None:
        """Stop the workers and gRPC, drain the engine, close storage (whatever was built so far)."""
        if "workers" in self.parts:
            self.parts["workers"].stop()
        if "host" in self.parts:
            self.parts["host"].close()
        if "grpc" in self.parts:
            self.parts["grpc"].stop(grace=5).wait()
        if "server" in self.parts:
            self.parts["server"].close()

    def _worker_listening(self, index: int) -> None:
        """Once every worker serves the shared port, the server is ready and this process leaves the port
        (until then its start-up gate answers /readyz 503, so no request meets a worker still starting): its
        HTTP work would share the GIL
        with the engine thread (the H200 profile: pydantic and SQLite reads of this process's share of the
        connections beside every step). Its listener closes (the kernel sends new connections to the
        workers) and its kept-alive connections are closed after their next response."""
        self._listening.add(index)
        if len(self._listening) < self.cfg.workers or self.parts.get("server") is None:
            return
        self._ready(self.parts["server"])
        self.parts["server"].state.left_port = True
        for listener in self.web.servers:
            listener.get_loop().call_soon_threadsafe(listener.close)
        log.info("all %d workers listen on port %d: the engine process left it", self.cfg.workers, self.cfg.port)

    def _prepare(self) -> None:
        cfg, prep = self.cfg, self.prep
        try:
            if self.train_models is not None:
                prep.update("training demo models", 0.01)
                self.train_models(lambda status, fraction: prep.update(status, 0.8 * fraction))
            prep.update("loading models", 0.8)
            server = self.parts["server"] = build_server(cfg, self.model_path, self.device)
            prep.update("warming up", 0.85)
            warm_all(server.engine, progress=lambda f: prep.update("warming up", 0.85 + 0.14 * f))
            if cfg.grpc_port:
                from grinfer.serving.grpc_server import start_grpc_server

                self.parts["grpc"] = start_grpc_server(server.state.service, server.state.metrics, cfg.host,
                                                       cfg.grpc_port, api_key=cfg.api_key,
                                                       reuse_port=cfg.grpc_reuse_port)
            if cfg.workers:  # ready once every worker listens (_worker_listening): until then /readyz is 503
                prep.update("starting the front-end workers", 0.99)
                self.parts["host"] = EngineHost(server.engine, self.engine_socket, on_listening=self._worker_listening)
                self.parts["workers"] = Workers(cfg, self.engine_socket)
            else:
                self._ready(server)
        except Exception as exc:  # the server must not go on half-prepared
            if not isinstance(exc, StartupError):
                log.exception("start-up failed")
            prep.error = str(exc)
            self.web.should_exit = True

    def _ready(self, server: Server) -> None:
        self.gate.open(create_app(server.state))
        log.info("ready in %.1f s: http://%s:%d (gRPC %s)", time.monotonic() - self.prep.started, self.cfg.host,
                 self.cfg.port, self.cfg.grpc_port or "off")


def _plan(model_path: Path, train_models: TrainModels | None) -> str:
    """The one line saying what start-up will do and roughly how long."""
    if train_models is not None:
        return (f"training the demo models into {model_path} (first start only: a few minutes on 2 CPU cores, "
                "under a minute on a GPU), then loading, warm-up; /readyz answers 503 with progress until then")
    return f"loading {model_path}, warm-up (seconds; CUDA graphs and compiles up to a minute on a GPU)"
