"""A live grinfer for hostile-input tests: REST (uvicorn) and gRPC servers over one real service,
an SQLite store with a small synthetic dataset imported, and the in-process cache."""

from __future__ import annotations

import grpc
import httpx
import torch

from grinfer.config import preset
from grinfer.data import generate_synthetic
from grinfer.engine import Engine
from grinfer.model import build_model
from grinfer.serving.app import AppState, create_app
from grinfer.serving.background import BackgroundServer
from grinfer.serving.grpc_server import start_grpc_server
from grinfer.serving.metrics import Metrics
from grinfer.serving.proto import grinfer_pb2_grpc as pb_grpc
from grinfer.serving.service import RecommenderService
from grinfer.storage import open_cache, open_store
from grinfer.storage.importer import import_dataset

API_KEY = "hostile-s3cret"
NUM_ITEMS = 50


class LiveStack:
    """Both servers started; `url`, `http` (keyless httpx client), `stub` (gRPC), `close()`."""

    def __init__(self, db_path):
        torch.manual_seed(0)
        self.ds = generate_synthetic(num_users=10, num_items=NUM_ITEMS, mean_events=12, seed=0)
        cat = self.ds.catalog
        cfg = preset("mtgr-tiny").with_vocab(num_items=NUM_ITEMS, num_genres=cat.num_genres,
                                             num_year_buckets=max(19, cat.num_year_buckets))
        self.store, self.cache = open_store(f"sqlite:///{db_path}"), open_cache("memory://")
        import_dataset(self.ds, self.store, progress=False)
        self.engine = Engine(build_model(cfg).eval(), cat).start()
        self.service = RecommenderService(self.engine, cat, self.store, self.cache)
        self.metrics = Metrics(self.engine, "eager")
        self.engine.on_step = self.metrics.on_step
        self.app = create_app(AppState(self.service, self.metrics, api_key=API_KEY, max_body_bytes=64 * 1024))
        self.rest = BackgroundServer(self.app)
        self.url = self.rest.start()
        self.http = httpx.Client(base_url=self.url, timeout=30)
        self.grpc = start_grpc_server(self.service, self.metrics, "127.0.0.1", 0, api_key=API_KEY)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc.port}")
        self.stub = pb_grpc.RecommenderStub(self.channel)

    def raw_item(self, dense: int) -> int:
        return int(self.ds.catalog.raw_ids[dense])

    def user(self) -> str:
        return str(self.ds.users[0].user_id)

    def series(self) -> set[str]:
        """The metric series /metrics exports (name and labels, no value)."""
        text = self.http.get("/metrics").text
        return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}

    def close(self) -> None:
        self.channel.close()
        self.grpc.stop(grace=1).wait()
        self.http.close()
        self.rest.stop()
        self.engine.shutdown()
        self.cache.close()
        self.store.close()
