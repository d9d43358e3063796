"""Assemble and run the server: checkpoint + store + cache -> engine -> service -> REST (+ gRPC)."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from grinfer.config import EngineConfig, ServerConfig
from grinfer.data.types import ItemCatalog
from grinfer.engine import Engine
from grinfer.model.checkpoint import load_checkpoint, read_checkpoint_meta
from grinfer.serving.app import AppState, create_app
from grinfer.serving.metrics import Metrics
from grinfer.serving.service import RecommenderService, ServiceSettings
from grinfer.storage import open_cache, open_store

log = logging.getLogger("grinfer.serve")
RANKING_DIR, RETRIEVAL_DIR = "ranking", "retrieval"


class StartupError(RuntimeError):
    """The server cannot start with this configuration (message says why and what to do)."""


@dataclass
class Server:
    """Everything a running server holds; `close()` releases it in order."""

    state: AppState
    engine: Engine
    store: object
    cache: object

    def close(self) -> None:
        self.state.draining = True
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
            raise StartupError("store: it holds no item catalogue; load one with `grinfer import-movielens DIR`")
        from grinfer.data import load_dataset
        from grinfer.storage.importer import import_dataset

        log.info("empty store: importing %s", data_spec)
        ds = load_dataset(data_spec)
        import_dataset(ds, store)
        catalog = ds.catalog
    if catalog.num_items != num_items:
        raise StartupError(f"store: its catalogue has {catalog.num_items} items but the model was trained on "
                           f"{num_items}; serve a model trained on this catalogue")
    return catalog


def build_server(cfg: ServerConfig, model_path: Path, device: str) -> Server:
    """Load models, open storage, start the engine; returns the assembled server (not yet listening)."""
    ranking_dir, retrieval_dir = model_dirs(model_path)
    ranker = load_checkpoint(ranking_dir, map_location="cpu")
    if ranker.cfg.kind != "mtgr":
        raise StartupError(f"model: {ranking_dir} is a {ranker.cfg.kind} model; ranking needs an mtgr checkpoint")
    retriever = load_checkpoint(retrieval_dir, map_location="cpu") if retrieval_dir else None
    store = open_store(cfg.store)
    cache = open_cache(cfg.cache)
    data_spec = read_checkpoint_meta(ranking_dir).get("training", {}).get("data")
    catalog = resolve_catalog(store, data_spec, ranker.cfg.num_items)
    store.register_model(ranker.cfg.name, str(model_path.resolve()), {"ranking": str(ranking_dir),
                                                                       "retrieval": str(retrieval_dir or "")})
    engine_cfg = EngineConfig(backend=cfg.backend, device=device,
                              dtype="bfloat16" if device.startswith("cuda") else "float32",
                              kv_cache_bytes=cfg.kv_cache_mb << 20, max_queue=cfg.max_queue,
                              max_batch_tokens=cfg.max_batch_tokens)
    engine = Engine(ranker, catalog, engine_cfg, retriever=retriever)
    metrics = Metrics(engine, cfg.backend)
    engine.on_step = metrics.on_step
    engine.start()
    service = RecommenderService(engine, catalog, store, cache, ServiceSettings(user_ttl_s=cfg.user_ttl_s),
                                 model_name=ranker.cfg.name)
    state = AppState(service, metrics, api_key=cfg.api_key, max_body_bytes=cfg.max_body_bytes)
    return Server(state, engine, store, cache)


def run(cfg: ServerConfig, model_path: Path, device: str) -> None:
    """Serve REST (and gRPC when grpc_port > 0) until SIGINT/SIGTERM; in-flight requests drain first."""
    import uvicorn

    server = build_server(cfg, model_path, device)
    app = create_app(server.state)
    grpc_server = None
    if cfg.grpc_port:
        from grinfer.serving.grpc_server import start_grpc_server

        grpc_server = start_grpc_server(server.state.service, server.state.metrics, cfg.host, cfg.grpc_port,
                                        api_key=cfg.api_key)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        if grpc_server is not None:
            grpc_server.stop(grace=5).wait()
        server.close()

    app.router.lifespan_context = lifespan
    log.info("serving %s on http://%s:%d (gRPC %s), device %s (%s)", model_path, cfg.host, cfg.port,
             cfg.grpc_port or "off", device, torch.__version__)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, timeout_graceful_shutdown=30)
