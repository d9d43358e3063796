"""The REST adapter: FastAPI routes over RecommenderService, with limits, auth, errors and metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from importlib.resources import files
from typing import Annotated

from fastapi import Depends, FastAPI, Header, Path, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.security import APIKeyHeader, HTTPBearer
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException

from grinfer.schema import (
    IDEMPOTENCY_KEY_RULES,
    USER_ID_RULES,
    BackendsOut,
    ErrorOut,
    EventsIn,
    EventsOut,
    RankIn,
    RankOut,
    RecommendIn,
    RollIn,
    RollOut,
    UserOut,
    UsersOut,
    UsersQuery,
    field_path,
)
from grinfer.serving.errors import MAPPED_TYPES, VALIDATION, mapped
from grinfer.serving.front import RequestFront
from grinfer.serving.kserve.rest import kserve_router
from grinfer.serving.metrics import Metrics
from grinfer.serving.models_api import forcing_arm, models_router
from grinfer.serving.phases import Phases, phases_of
from grinfer.serving.service import FieldError, RecommenderService, check_user_header
from grinfer.storage.resilient import health_of

DOCS_ASSETS = "/docs-assets"  # Swagger UI's script, style and icon, from the fastapi-offline package
ERROR_TEXT = {400: "Both Content-Length and Transfer-Encoding given (field `body`)",
              401: "Missing or wrong API key (field `x-api-key`); checked before the body is read",
              404: "Unknown user, model version or experiment, or no such route",
              409: "The checkpoint's content hash differs from its registered one (field `version`)",
              413: "Body over the size limit, or the user's context too long",
              415: "Body not declared application/json", 422: "A field fails validation (field names it)",
              429: "Server saturated (admission) or engine queue full: retry after Retry-After seconds",
              503: "Shutting down, engine or store unavailable: retry after Retry-After seconds",
              504: "deadline_ms passed before the scores were ready"}
# the user a balancer hashes on (nginx, HAProxy, Envoy: consistent hash of this header); checked against the body
UserHeader = Annotated[str | None, Header(description="The request's user, for a user-affine balancer; must be the "
                                                      "body's user (422, field `user`, otherwise)")]
MAX_RECENT = 10_000  # GET /v1/users/{user}?recent=: more events than a context holds
RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "string"}}}


def _errors(*statuses: int) -> dict:
    """OpenAPI responses for the error statuses a route can answer, each an ErrorOut body."""
    return {status: {"model": ErrorOut, "description": ERROR_TEXT[status],
                     **({"headers": RETRY_AFTER} if status in (429, 503) else {})} for status in statuses}


BODY_ERRORS = (400, 413, 415, 422, 503)  # a JSON-body route: framing, size, media type, validation, draining
RANKED_ERRORS = _errors(*BODY_ERRORS, 429, 504)
WRITE_ERRORS = _errors(*BODY_ERRORS, 401, 404)


@dataclass
class AppState:
    """What the routes need: the service, metrics, limits and the readiness probe."""

    service: RecommenderService
    metrics: Metrics
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    retry_after_s: int = 1
    draining: bool = False
    process: str = "engine"  # which process answers (X-Grinfer-Process): "engine", or "worker-N" with --workers
    left_port: bool = False  # the engine process, once its workers listen: it answers only kept-alive connections
    backend_setting: str = "eager"  # the configured --backend (auto resolves to the engine's primary)
    apply_registry: Callable[[], dict | None] | None = None  # registry mode, engine process: apply the plan now

    @property
    def replica(self) -> bytes:
        """This replica's name, the X-Grinfer-Replica header's value."""
        return self.service.settings.replica.encode()


def _error(status: int, message: str, field: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(ErrorOut(error=message, field=field).model_dump(), status_code=status, headers=headers)


def create_app(state: AppState) -> FastAPI:  # noqa: C901 (one nested function per route)
    """The FastAPI application (Swagger UI at /docs, its assets served from fastapi-offline's copy: no CDN).

    No /redoc: ReDoc's page loads its logo from the vendor's CDN.
    """
    app = FastAPIOffline(title="grinfer", version="0.1.0", static_url=DOCS_ASSETS, redoc_url=None,
                         description="Generative-recommender inference: rank, recommend, events.")
    app.state.grinfer = state
    app.add_middleware(RequestFront, state=state)
    service, metrics = state.service, state.metrics
    metrics.watch(service)

    async def require_json(request: Request) -> None:
        """415 unless the body is declared JSON (application/json or application/*+json)."""
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
            raise FieldError("content-type", f"expected application/json, got {media or 'none'}", status=415)

    def fail(request: Request, status: int, kind: str, message: str, field: str | None = None,
             retry: bool = False) -> JSONResponse:
        """The error response ("field: message" when a field is known), counted under the request's route."""
        metrics.error(Metrics.route_label(request.scope), kind)
        headers = {"Retry-After": str(state.retry_after_s)} if retry else None
        return _error(status, f"{field}: {message}" if field else message, field, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            return fail(request, VALIDATION.http, VALIDATION.kind, first.get("msg", "invalid JSON"), "body")
        field = field_path([p for p in first.get("loc", ()) if p not in ("body", "path", "query")]) or "body"
        return fail(request, VALIDATION.http, VALIDATION.kind, first.get("msg", "invalid"), field)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    async def _mapped(request: Request, exc: Exception):
        """FieldError, the engine's and the store's errors, answered from grinfer/serving/errors.py's table."""
        how = mapped(exc)
        assert how is not None  # registered for MAPPED_TYPES only
        return fail(request, how.http, how.kind, str(exc), how.field, retry=how.retry)

    for error_type in MAPPED_TYPES:
        app.add_exception_handler(error_type, _mapped)

    json_body = [Depends(require_json)]
    # The key itself is checked by RequestFront before the body is read; these declare it in OpenAPI.
    keyed = [Security(APIKeyHeader(name="X-API-Key", auto_error=False)), Security(HTTPBearer(auto_error=False))]

    @app.post("/v1/rank", response_model=RankOut, responses=RANKED_ERRORS, dependencies=json_body)
    async def rank(body: RankIn, request: Request, x_user_id: UserHeader = None) -> Response:
        """Score candidate items for a user (per-task probabilities and a fused score, best first)."""
        check_user_header(x_user_id, body.user)
        phases = phases_of(request.scope)
        phases.mark("parse")
        with forcing_arm(request, state.api_key):
            return _ranked(await service.rank(body, phases), phases)

    @app.post("/v1/recommend", response_model=RankOut, responses=RANKED_ERRORS, dependencies=json_body)
    async def recommend(body: RecommendIn, request: Request, x_user_id: UserHeader = None) -> Response:
        """Top-k items for a user: retrieval over the catalogue, then MTGR ranking."""
        check_user_header(x_user_id, body.user)
        phases = phases_of(request.scope)
        phases.mark("parse")
        with forcing_arm(request, state.api_key):
            return _ranked(await service.recommend(body, phases), phases)

    def _ranked(out: RankOut, phases: Phases) -> Response:
        """The ranked response, serialised by pydantic-core straight to JSON bytes (no re-validation); the
        X-Grinfer-Cache header repeats the context's KV-cache status for balancer logs."""
        metrics.cache_status.labels(out.cache).inc()
        response = Response(out.model_dump_json(), media_type="application/json",
                            headers={"X-Grinfer-Cache": out.cache, "X-Grinfer-Arm": out.arm,
                                     "X-Grinfer-Model-Version": out.model_version})
        phases.mark("encode")
        return response

    @app.post("/v1/events", response_model=EventsOut, responses=WRITE_ERRORS, dependencies=[*keyed, *json_body])
    async def events(body: EventsIn, idempotency_key: Annotated[str | None, Header(
            **IDEMPOTENCY_KEY_RULES)] = None, x_user_id: UserHeader = None) -> EventsOut:
        """Append behaviour events; they are durable before this returns (once per idempotency key)."""
        check_user_header(x_user_id, body.user)
        return await asyncio.to_thread(service.append_events, body, idempotency_key)

    @app.get("/v1/users/{user}", response_model=UserOut, responses=_errors(404, 422, 503))
    async def get_user(user: Annotated[str, Path(**USER_ID_RULES)], x_user_id: UserHeader = None,
                       recent: Annotated[int, Query(ge=1, le=MAX_RECENT, description="How many of the most recent "
                                                    "events to return, newest first.")] = 20) -> UserOut:
        """A user's profile, history version and recent events."""
        check_user_header(x_user_id, user)
        return await asyncio.to_thread(service.get_user, user, recent)

    @app.get("/v1/users", response_model=UsersOut, responses=_errors(422, 503))
    async def list_users(query: Annotated[UsersQuery, Query()]) -> UsersOut:
        """Known user ids, a page at a time (limit 1..1000, offset >= 0), and how many there are."""
        return await asyncio.to_thread(service.list_users, query)

    @app.post("/v1/admin/roll-history", response_model=RollOut, responses=WRITE_ERRORS,
              dependencies=[*keyed, *json_body])
    async def roll_history(body: RollIn, x_user_id: UserHeader = None) -> RollOut:
        """Fold real-time events into the static history (bumps the history version; nothing to fold: no change)."""
        check_user_header(x_user_id, body.user)
        return await asyncio.to_thread(service.roll_history, body)

    @app.get("/v1/admin/backends", response_model=BackendsOut)
    async def backends() -> BackendsOut:
        """The backend chain: which backend serves, each one's health, fallbacks so far, auto's probe table."""
        stats = await asyncio.to_thread(service.engine.stats)
        strategy = stats["strategy"]
        return BackendsOut(configured=state.backend_setting, primary=strategy["primary"], active=strategy["active"],
                           chain=strategy["backends"], fallbacks=strategy["fallbacks"], probes=stats["probes"])

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", responses=_errors(503))
    async def readyz():
        if state.draining:
            return _error(503, "server is shutting down")
        problem = await asyncio.to_thread(service.unready)
        if problem is not None:
            return _error(503, problem)
        return {"status": "ready", "model": service.model_name, "cache": health_of(service.cache)}

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text exposition format 0.0.4"}})
    async def metrics_endpoint() -> Response:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    app.include_router(kserve_router(state))  # KServe v2 / Open Inference Protocol: /v2/...
    # the model registry and A/B arms: /v1/admin/models, /v1/admin/arms; promote answers 401 without the key,
    # 404 for an unknown version and 409 for a checkpoint whose hash changed
    app.include_router(models_router(state), responses=_errors(*BODY_ERRORS, 401, 404, 409))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(files("grinfer.serving").joinpath("web/index.html").read_text())

    return app
