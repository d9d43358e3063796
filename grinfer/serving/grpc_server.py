"""The gRPC adapter: grinfer.v1.Recommender over RecommenderService, plus health and reflection (and, on
the same port, KServe v2's inference.GRPCInferenceService: grinfer/serving/kserve/grpc_service.py).

A thin twin of the REST adapter (app.py). Each RPC turns its proto message into the pydantic model
of grinfer/schema.py, so validation is the REST API's, calls the service and turns the result back.

    server = start_grpc_server(service, metrics, "127.0.0.1", 0, api_key="secret")
    server.port            # the bound port (the chosen one when port 0 was asked for)
    server.stop(grace=5).wait()

Stubs: grinfer/serving/proto/grinfer_pb2*.py are generated from grinfer.proto by a build step and
committed (no protoc at run time): after editing the .proto, run `python -m grinfer.serving.proto.generate`
(or scripts/gen_proto.sh); tests/serving/test_grpc.py fails while the committed stubs are stale.

Concurrency: a thread pool (max_workers) serves RPCs; the service's async operations (rank,
recommend) run as coroutines on ONE asyncio event loop owned by the server (a background thread in
`loop.run_forever()`); a worker thread submits with `asyncio.run_coroutine_threadsafe` and waits, so
many RPCs are in the engine at once and get batched together. The blocking operations (append
events, roll history, GetUser, ListUsers) run on the worker thread itself. `stop()` stops the server, then the loop.

Errors: the REST adapter's codes, from the one table in grinfer/serving/errors.py; the details text is
"field: message" where a field is known, and the trailing metadata `grinfer-field` names it. Only gRPC has:
request bytes that are not a valid message (INVALID_ARGUMENT, field `request`; logged at most once a minute),
a call cancelled while it runs (CANCELLED), and DeadlineExceeded from the call's gRPC deadline when
deadline_ms is unset (DEADLINE_EXCEEDED). A missing or wrong API key (x-api-key or `authorization: Bearer`)
is a FieldError 401: UNAUTHENTICATED.

Fleet: Rank, Recommend, AppendEvents and RollHistory accept metadata `x-user-id` (what a balancer hashes;
it must be the message's user) and name the replica in the trailing metadata `x-grinfer-replica`.

Metrics: latency per RPC as endpoint "grpc:<Method>", errors by the REST adapter's kinds, and the
context cache status of ranked requests.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent import futures
from typing import Annotated, TypeVar

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydantic import Field, TypeAdapter, ValidationError

from grinfer.schema import (
    IDEMPOTENCY_KEY_RULES,
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
from grinfer.serving.auth import KEY_FIELD, KEY_MESSAGE, key_accepted
from grinfer.serving.errors import VALIDATION, mapped
from grinfer.serving.metrics import Metrics
from grinfer.serving.proto import grinfer_pb2 as pb
from grinfer.serving.proto import grinfer_pb2_grpc as pb_grpc
from grinfer.serving.service import FieldError, RecommenderService, check_user_header

log = logging.getLogger("grinfer.grpc")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Recommender"].full_name  # "grinfer.v1.Recommender"
FIELD_METADATA = "grinfer-field"
IDEMPOTENCY_METADATA = "idempotency-key"
USER_METADATA, REPLICA_METADATA = "x-user-id", "x-grinfer-replica"  # balancer's hash key in; serving replica out
ARM_METADATA, VERSION_METADATA = "x-grinfer-arm", "x-grinfer-model-version"  # who scored a ranked answer
_IDEMPOTENCY_KEY = TypeAdapter(Annotated[str, Field(**IDEMPOTENCY_KEY_RULES)])
MAX_DEADLINE_MS = 600_000  # RankIn / RecommendIn's limit on deadline_ms
UNDECODABLE_LOG_INTERVAL_S = 60.0  # undecodable requests are logged at most once per this many seconds
T = TypeVar("T")
Deadlined = TypeVar("Deadlined", RankIn, RecommendIn)


def _text_metadata(context: grpc.ServicerContext) -> dict[str, str]:
    """The call's text metadata (binary `-bin` entries left out)."""
    return {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}


class _Abort(Exception):
    """An RPC's failure, already classified: code, details, metric kind, field."""

    def __init__(self, code: grpc.StatusCode, details: str, kind: str, field: str | None = None):
        super().__init__(details)
        self.code, self.details, self.kind, self.field = code, details, kind, field


def _classify(exc: Exception) -> _Abort:
    """Map the service's and the engine's errors to gRPC status codes (as app.py maps them to HTTP)."""
    if isinstance(exc, ValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        field = field_path(first.get("loc", ())) or "request"
        return _Abort(VALIDATION.grpc, f"{field}: {first.get('msg', 'invalid')}", VALIDATION.kind, field)
    how = mapped(exc)
    if how is not None:
        return _Abort(how.grpc, how.message(exc), how.kind, how.field)
    if isinstance(exc, futures.CancelledError):  # the call ended (client cancel or its deadline) while ranking
        return _Abort(grpc.StatusCode.CANCELLED, "call cancelled", "cancelled")
    log.exception("internal error in a gRPC call", exc_info=exc)
    return _Abort(grpc.StatusCode.INTERNAL, "internal error", "internal")


# ---- undecodable requests ------------------------------------------------------------------------
class Undecodable:
    """What a method receives when its bytes are not a valid message of its request type."""

    def __init__(self, type_name: str, error: DecodeError):
        self.type_name, self.error = type_name, error


def lenient_parser(message_type) -> Callable[[bytes], object]:
    """A request deserializer that returns Undecodable instead of raising (grpcio answers INTERNAL to a raise)."""
    def parse(data: bytes):
        try:
            return message_type.FromString(data)
        except DecodeError as exc:  # truncated or garbage bytes, invalid UTF-8 in a string field
            return Undecodable(message_type.DESCRIPTOR.full_name, exc)
    return parse


class RateLimitedLog:
    """A warning at most once per `interval_s`, carrying how many were held back since the last one."""

    def __init__(self, interval_s: float):
        self.interval_s, self._next, self._held = interval_s, float("-inf"), 0
        self._lock = threading.Lock()

    def warning(self, message: str, *args) -> None:
        with self._lock:
            now = time.monotonic()
            if now < self._next:
                self._held += 1
                return
            held, self._held, self._next = self._held, 0, now + self.interval_s
        log.warning(message + " (%d more not logged since the last report)", *args, held)


# ---- proto <-> schema ----------------------------------------------------------------------------
def _optional(message, *names: str) -> dict:
    """The optional fields that are set (unset ones take the schema's defaults)."""
    return {name: getattr(message, name) for name in names if message.HasField(name)}


def _event(e: pb.Event) -> dict:
    return {"item": e.item, **_optional(e, "ts", "action")}


def rank_in(msg: pb.RankRequest) -> RankIn:
    return RankIn.model_validate({"user": msg.user, "candidates": [{"item": c.item} for c in msg.candidates],
                                  "events": [_event(e) for e in msg.events], **_optional(msg, "deadline_ms")})


def recommend_in(msg: pb.RecommendRequest) -> RecommendIn:
    return RecommendIn.model_validate({"user": msg.user, **_optional(msg, "k", "retrieve", "deadline_ms")})


def _metadata_key(context: grpc.ServicerContext) -> str | None:
    """The idempotency-key metadata, checked as the request's idempotency_key field is (None if absent)."""
    key = _text_metadata(context).get(IDEMPOTENCY_METADATA)
    if key is None:
        return None
    try:
        return _IDEMPOTENCY_KEY.validate_python(key)
    except ValidationError as exc:
        raise FieldError(IDEMPOTENCY_METADATA, exc.errors()[0]["msg"]) from None


def events_in(msg: pb.AppendEventsRequest) -> EventsIn:
    return EventsIn.model_validate({"user": msg.user, "events": [_event(e) for e in msg.events],
                                    **_optional(msg, "idempotency_key")})


def roll_in(msg: pb.RollHistoryRequest) -> RollIn:
    return RollIn.model_validate({"user": msg.user})


def user_id(msg: pb.GetUserRequest) -> str:
    """The user id, checked by the user-id rules REST applies to its path (so the messages match)."""
    return RollIn.model_validate({"user": msg.user}).user


def users_query(msg: pb.ListUsersRequest) -> UsersQuery:
    return UsersQuery.model_validate(_optional(msg, "limit", "offset"))


def rank_out(out: RankOut) -> pb.RankResponse:
    items = [pb.ScoredItem(item=i.item, score=i.score, probabilities=i.probabilities, title=i.title)
             for i in out.items]
    return pb.RankResponse(user=out.user, items=items, cache=out.cache, history_version=out.history_version,
                           cold_start=out.cold_start, latency_ms=out.latency_ms)


def events_out(out: EventsOut) -> pb.AppendEventsResponse:
    return pb.AppendEventsResponse(user=out.user, appended=out.appended, realtime_events=out.realtime_events)


def roll_out(out: RollOut) -> pb.RollHistoryResponse:
    return pb.RollHistoryResponse(user=out.user, history_version=out.history_version, folded=out.folded)


def user_out(out: UserOut) -> pb.UserResponse:
    recent = [pb.UserEvent(item=e.item, ts=e.ts, action=e.action, title=e.title) for e in out.recent]
    return pb.UserResponse(user=out.user, profile=out.profile, history_version=out.history_version,
                           static_events=out.static_events, realtime_events=out.realtime_events, recent=recent)


def users_out(out: UsersOut) -> pb.ListUsersResponse:
    return pb.ListUsersResponse(users=out.users, total=out.total)


# ---- the servicer ----------------------------------------------------------------------------------
class _EventLoop:
    """One asyncio loop in a background thread; worker threads run coroutines on it and wait."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self._closing = threading.Lock()
        self._thread = threading.Thread(target=self.loop.run_forever, name="grinfer-grpc-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[object, object, T], context: grpc.ServicerContext) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)

        def stop_waiting() -> None:  # the call ended (e.g. the client cancelled)
            future.cancel()

        context.add_callback(stop_waiting)
        return future.result()

    def close(self) -> None:
        """Stop the loop after its default executor (asyncio.to_thread work) has finished; idempotent."""
        with self._closing:
            if self.loop.is_closed():
                return
            asyncio.run_coroutine_threadsafe(self.loop.shutdown_default_executor(), self.loop).result()
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()
            self.loop.close()


def _with_call_deadline(req: Deadlined, context: grpc.ServicerContext) -> Deadlined:
    """Without deadline_ms, the call's own gRPC deadline (if any) becomes the engine's deadline."""
    remaining = context.time_remaining()
    if req.deadline_ms is not None or remaining is None:
        return req
    return req.model_copy(update={"deadline_ms": max(1, min(MAX_DEADLINE_MS, int(remaining * 1e3)))})


class GuardedServicer:
    """What grinfer's servicers share: undecodable requests and errors answered with status codes, timed."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self.named: tuple[tuple[str, str], ...] = ()  # trailing metadata every answer carries (the replica)
        self.undecodable_log = RateLimitedLog(UNDECODABLE_LOG_INTERVAL_S)

    def guarded(self, method: str) -> Callable:
        """The method, answering INVALID_ARGUMENT (logged at most once a minute) to an undecodable request."""
        serve = getattr(self, method)

        def call(request, context: grpc.ServicerContext):
            if not isinstance(request, Undecodable):
                return serve(request, context)
            self.metrics.error(f"grpc:{method}", "decode")
            self.undecodable_log.warning("gRPC %s: undecodable %s from %s: %s", method, request.type_name,
                                         context.peer(), request.error)
            context.set_trailing_metadata(((FIELD_METADATA, "request"),))
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: not a valid {request.type_name} message")
        return call

    def _call(self, method: str, context: grpc.ServicerContext, work: Callable[[], T]) -> T:
        """Run one RPC: time it, map its error to a status (context.abort raises)."""
        endpoint = f"grpc:{method}"
        start = time.perf_counter()
        try:
            return work()
        except Exception as exc:
            abort = _classify(exc)
            self.metrics.error(endpoint, abort.kind)
            if abort.field is not None:  # replaces the trailing metadata: the replica's name goes again
                context.set_trailing_metadata(((FIELD_METADATA, abort.field), *self.named))
            context.abort(abort.code, abort.details)
        finally:
            self.metrics.observe(endpoint, time.perf_counter() - start)



class RecommenderServicer(GuardedServicer, pb_grpc.RecommenderServicer):
    """grinfer.v1.Recommender: proto in, schema model, service call, proto out."""

    def __init__(self, service: RecommenderService, metrics: Metrics, loop: _EventLoop, api_key: str | None = None):
        super().__init__(metrics)
        self.service, self.loop, self.api_key = service, loop, api_key
        self.named = ((REPLICA_METADATA, service.settings.replica),)

    def _require_key(self, context: grpc.ServicerContext) -> None:
        if self.api_key is None:
            return
        metadata = _text_metadata(context)
        if not key_accepted(self.api_key, metadata.get("x-api-key"), metadata.get("authorization")):
            raise FieldError(KEY_FIELD, KEY_MESSAGE, status=401)

    def _ranked(self, out: RankOut, context: grpc.ServicerContext) -> pb.RankResponse:
        """The ranked answer; the trailing metadata also names the A/B arm and model version that scored it."""
        self.metrics.cache_status.labels(out.cache).inc()
        context.set_trailing_metadata((*self.named, (ARM_METADATA, out.arm), (VERSION_METADATA, out.model_version)))
        return rank_out(out)

    def _served(self, context: grpc.ServicerContext, user: str) -> None:
        """Name this replica in the trailing metadata; the x-user-id metadata (the balancer's hash key), when
        sent, must be the request's user (INVALID_ARGUMENT naming `user` otherwise)."""
        context.set_trailing_metadata(self.named)
        check_user_header(_text_metadata(context).get(USER_METADATA), user)

    def Rank(self, request: pb.RankRequest, context: grpc.ServicerContext) -> pb.RankResponse:
        def work():
            self._served(context, request.user)
            req = _with_call_deadline(rank_in(request), context)
            return self._ranked(self.loop.run(self.service.rank(req), context), context)
        return self._call("Rank", context, work)

    def Recommend(self, request: pb.RecommendRequest, context: grpc.ServicerContext) -> pb.RankResponse:
        def work():
            self._served(context, request.user)
            req = _with_call_deadline(recommend_in(request), context)
            return self._ranked(self.loop.run(self.service.recommend(req), context), context)
        return self._call("Recommend", context, work)

    def AppendEvents(self, request: pb.AppendEventsRequest, context: grpc.ServicerContext) -> pb.AppendEventsResponse:
        def work():
            self._require_key(context)
            self._served(context, request.user)
            return events_out(self.service.append_events(events_in(request), _metadata_key(context)))
        return self._call("AppendEvents", context, work)

    def RollHistory(self, request: pb.RollHistoryRequest, context: grpc.ServicerContext) -> pb.RollHistoryResponse:
        def work():
            self._require_key(context)
            self._served(context, request.user)
            return roll_out(self.service.roll_history(roll_in(request)))
        return self._call("RollHistory", context, work)

    def GetUser(self, request: pb.GetUserRequest, context: grpc.ServicerContext) -> pb.UserResponse:
        return self._call("GetUser", context, lambda: user_out(self.service.get_user(user_id(request))))

    def ListUsers(self, request: pb.ListUsersRequest, context: grpc.ServicerContext) -> pb.ListUsersResponse:
        return self._call("ListUsers", context, lambda: users_out(self.service.list_users(users_query(request))))


def lenient_handler(servicer: GuardedServicer, module, service: str) -> grpc.GenericRpcHandler:
    """The methods of `service` in the generated `module` (from its descriptor), with lenient request parsers."""
    descriptor = module.DESCRIPTOR.services_by_name[service]
    handlers = {}
    for method in descriptor.methods:
        request_type, response_type = getattr(module, method.input_type.name), getattr(module, method.output_type.name)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            servicer.guarded(method.name), request_deserializer=lenient_parser(request_type),
            response_serializer=response_type.SerializeToString)
    return grpc.method_handlers_generic_handler(descriptor.full_name, handlers)


# ---- the server ------------------------------------------------------------------------------------
class GrpcServer(grpc.Server):
    """A started grpc.Server plus what it owns (event loop, health); `port` is the bound port."""

    def __init__(self, server: grpc.Server, port: int, loop: _EventLoop, health_servicer: health.HealthServicer):
        self._server, self.port, self._loop, self.health = server, port, loop, health_servicer

    def add_generic_rpc_handlers(self, generic_rpc_handlers):
        self._server.add_generic_rpc_handlers(generic_rpc_handlers)

    def add_registered_method_handlers(self, service_name, method_handlers):
        self._server.add_registered_method_handlers(service_name, method_handlers)  # pyright: ignore[reportAttributeAccessIssue] (newer than grpc's stubs)

    def add_insecure_port(self, address: str) -> int:
        return self._server.add_insecure_port(address)

    def add_secure_port(self, address: str, server_credentials) -> int:
        return self._server.add_secure_port(address, server_credentials)

    def start(self) -> None:
        self._server.start()

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self._server.wait_for_termination(timeout)

    def stop(self, grace: float | None) -> threading.Event:
        """Report NOT_SERVING, stop taking calls, let running ones finish within grace; then close the loop."""
        self.health.enter_graceful_shutdown()
        stopped = self._server.stop(grace)
        done = threading.Event()

        def finish():
            stopped.wait()
            self._loop.close()
            done.set()

        threading.Thread(target=finish, name="grinfer-grpc-stop", daemon=True).start()
        return done


def start_grpc_server(service: RecommenderService, metrics: Metrics, host: str, port: int, max_workers: int = 16,
                      api_key: str | None = None, reuse_port: bool = False) -> GrpcServer:
    """Serve grinfer.v1.Recommender, inference.GRPCInferenceService, grpc.health.v1 and reflection on host:port;
    returns it started.

    port 0 binds a free port: read it from the returned server's `port`. A port another process listens on is
    an OSError unless `reuse_port` (SO_REUSEPORT: servers share the port). With api_key, AppendEvents
    and RollHistory need metadata `x-api-key: <key>` (or `authorization: Bearer <key>`).
    """
    loop = _EventLoop()
    try:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grinfer-grpc"),
                             options=[("grpc.so_reuseport", int(reuse_port))])
        from grinfer.serving.kserve.grpc_service import KSERVE_SERVICE, kserve_handler

        server.add_generic_rpc_handlers((lenient_handler(RecommenderServicer(service, metrics, loop, api_key), pb,
                                                         "Recommender"), kserve_handler(service, metrics, loop)))
        health_servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        for name in ("", SERVICE_NAME, KSERVE_SERVICE):
            health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        reflection.enable_server_reflection((SERVICE_NAME, KSERVE_SERVICE, health.SERVICE_NAME,
                                             reflection.SERVICE_NAME), server)
        address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
        try:
            bound = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(f"gRPC: cannot bind {address}: {exc}") from exc
        if bound == 0:  # older grpcio versions report a failed bind this way
            raise OSError(f"gRPC: cannot bind {address}")
        server.start()
    except BaseException:
        loop.close()
        raise
    log.info("gRPC %s on %s:%d", SERVICE_NAME, host, bound)
    return GrpcServer(server, bound, loop, health_servicer)
