"""grinfer/serving/errors.py: each exception's HTTP status, gRPC code, field and metric kind, and both
adapters answering from it (REST through the real app, gRPC through its _classify)."""

from __future__ import annotations

from concurrent import futures

import grpc
import httpx
import pytest
from pydantic import BaseModel, ValidationError

from grinfer.config import EngineConfig, preset
from grinfer.data import generate_synthetic
from grinfer.engine import Engine
from grinfer.engine.request import ContextTooLarge, DeadlineExceeded, EngineError, Overloaded
from grinfer.model import build_model
from grinfer.serving import app as rest
from grinfer.serving.background import BackgroundServer
from grinfer.serving.errors import VALIDATION, mapped
from grinfer.serving.grpc_server import _classify
from grinfer.serving.metrics import Metrics
from grinfer.serving.service import FieldError, RecommenderService
from grinfer.storage import open_cache, open_store
from grinfer.storage.base import IdempotencyConflict, Unavailable

C = grpc.StatusCode


class _Later(EngineError):
    """An engine error the table does not name: answered as its base class."""


CASES = [  # exception, HTTP, gRPC, field, kind, Retry-After
    (Overloaded("queue full"), 429, C.RESOURCE_EXHAUSTED, None, "overloaded", True),
    (DeadlineExceeded("too late"), 504, C.DEADLINE_EXCEEDED, "deadline_ms", "deadline", False),
    (ContextTooLarge("too long"), 413, C.INVALID_ARGUMENT, "events", "context_too_large", False),
    (Unavailable("store down"), 503, C.UNAVAILABLE, None, "unavailable", True),
    (EngineError("engine stopped"), 503, C.UNAVAILABLE, None, "unavailable", True),
    (_Later("new kind"), 503, C.UNAVAILABLE, None, "unavailable", True),
    (FieldError("items", "unknown item 7"), 422, C.INVALID_ARGUMENT, "items", "field", False),
    (FieldError("body", "bad framing", status=400), 400, C.INVALID_ARGUMENT, "body", "field", False),
    (FieldError("user", "no such user", status=404), 404, C.NOT_FOUND, "user", "field", False),
    (FieldError("x-api-key", "wrong key", status=401), 401, C.UNAUTHENTICATED, "x-api-key", "field", False),
    (FieldError("content-type", "not JSON", status=415), 415, C.INVALID_ARGUMENT, "content-type", "field", False),
]


@pytest.mark.parametrize(("exc", "http", "code", "field", "kind", "retry"), CASES,
                         ids=[f"{type(c[0]).__name__}-{c[1]}" for c in CASES])
def test_each_exception_has_both_codes_and_its_field(exc, http, code, field, kind, retry):
    how = mapped(exc)
    assert how is not None
    assert (how.http, how.grpc, how.field, how.kind, how.retry) == (http, code, field, kind, retry)
    assert how.message(exc) == (f"{field}: {exc}" if field else str(exc))
    abort = _classify(exc)  # the gRPC adapter's answer
    assert (abort.code, abort.field, abort.kind, abort.details) == (code, field, kind, how.message(exc))


@pytest.mark.parametrize("exc", [ValueError("bug"), RuntimeError("bug"), IdempotencyConflict("reused key")])
def test_other_errors_are_internal(exc):
    assert mapped(exc) is None
    assert _classify(exc).code == C.INTERNAL


def test_validation_and_cancellation():
    class Body(BaseModel):
        k: int

    with pytest.raises(ValidationError) as caught:
        Body.model_validate({"k": "many"})
    abort = _classify(caught.value)
    assert (VALIDATION.http, abort.code, abort.field, abort.kind) == (422, C.INVALID_ARGUMENT, "k", "validation")
    assert _classify(futures.CancelledError()).code == C.CANCELLED


@pytest.fixture(scope="module")
def rest_client(tmp_path_factory):
    """The real REST app over a real (unstarted) engine and SQLite store, plus a route that raises CASES[i]."""
    ds = generate_synthetic(num_users=2, num_items=20, mean_events=5, seed=0)
    model = build_model(preset("mtgr-tiny").with_vocab(num_items=20, num_year_buckets=19)).eval()
    store, cache = open_store(f"sqlite:///{tmp_path_factory.mktemp('errors') / 'g.db'}"), open_cache("memory://")
    engine = Engine(model, ds.catalog, EngineConfig())
    app = rest.create_app(rest.AppState(RecommenderService(engine, ds.catalog, store, cache), Metrics(engine, "eager")))

    async def raise_case(i: int):
        raise CASES[i][0]

    app.add_api_route("/raise/{i}", raise_case)
    with BackgroundServer(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client
    store.close()
    cache.close()


@pytest.mark.parametrize("i", range(len(CASES)), ids=[f"{type(c[0]).__name__}-{c[1]}" for c in CASES])
def test_rest_answers_from_the_table(rest_client, i):
    exc, http, _, field, _, retry = CASES[i]
    response = rest_client.get(f"/raise/{i}")
    assert response.status_code == http
    assert response.json() == {"error": f"{field}: {exc}" if field else str(exc), "field": field}
    assert ("retry-after" in response.headers) == retry
