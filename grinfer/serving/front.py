"""The REST front, as one pure-ASGI middleware: draining, the API key of the write routes (checked
before the body is read, so keyless writes learn nothing about validation), admission at the door
(a saturated server answers rank, recommend and KServe inference 429 before the body is read), body limits, latency
and phase metrics, and the `X-Grinfer-Process` / `X-Grinfer-Replica` headers naming the process and
the replica that answered.

Pure ASGI (no `BaseHTTPMiddleware`): no extra task, stream or response copy per request. Every body
byte is counted whatever the headers declare; the body is read here (up to the limit) and handed to
the app whole, so an over-long body is refused with 413 before any of it is parsed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

from grinfer.engine.request import Overloaded
from grinfer.serving.admission import at_door
from grinfer.serving.auth import KEY_FIELD, KEY_MESSAGE, key_accepted
from grinfer.serving.metrics import Metrics
from grinfer.serving.phases import Phases

_BODY_METHODS = {"POST", "PUT", "PATCH"}
# the write routes: an API key is checked first
KEYED_PATHS = frozenset({"/v1/events", "/v1/admin/roll-history", "/v1/admin/models/promote"})
ADMITTED_PATHS = frozenset({"/v1/rank", "/v1/recommend"})  # refused at the door (429) when the server is saturated


class RequestFront:
    """ASGI middleware over the FastAPI app; `state` is the app's AppState (limits, metrics, draining)."""

    def __init__(self, app, state):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state, start = self.state, time.perf_counter()
        retry = [(b"retry-after", str(state.retry_after_s).encode())]
        if state.draining and scope["path"].startswith("/v1/"):
            await _reply(send, 503, "server is shutting down", None, retry)
            return
        headers = dict(scope["headers"])
        route_path = scope["path"].removeprefix(scope.get("root_path", ""))  # as the router matches it
        if state.api_key is not None and route_path in KEYED_PATHS and not _has_key(headers, state.api_key):
            await _reply(send, 401, f"{KEY_FIELD}: {KEY_MESSAGE}", KEY_FIELD, [(b"www-authenticate", b"Bearer")])
            state.metrics.error(route_path, "auth")
            return
        gate = state.service.admission if scope["method"] == "POST" and _admitted(route_path) else None
        if gate is not None:  # admission at the door: the place is held until the response is sent
            try:
                admitted_at = gate.enter()
            except Overloaded as exc:  # refused before the body is read (admission.py)
                await _reply(send, 429, str(exc), None, retry)
                state.metrics.error(Metrics.route_label(scope), "overloaded")
                return
            door = at_door.set(True)
            try:
                await self._serve(scope, receive, send, start)
            finally:
                at_door.reset(door)
                gate.leave(admitted_at)
            return
        await self._serve(scope, receive, send, start)

    async def _serve(self, scope, receive, send, start: float) -> None:
        """Body limits, then the app, with the phase and latency metrics and the naming headers."""
        state = self.state
        headers = dict(scope["headers"])
        if scope["method"] in _BODY_METHODS:
            if b"content-length" in headers and b"transfer-encoding" in headers:
                await _reply(send, 400, "body: both Content-Length and Transfer-Encoding given", "body")
                return
            declared = headers.get(b"content-length", b"")
            if declared.isdigit() and int(declared) > state.max_body_bytes:
                await _reply(send, 413, f"body: {int(declared)} bytes exceed the limit of {state.max_body_bytes}",
                             "body")
                return
            body = await _read_body(receive, state.max_body_bytes)
            if body is None:
                await _reply(send, 413, f"body: more than the limit of {state.max_body_bytes} bytes", "body")
                return
            receive = _replay(body, receive)
        phases = Phases(start)
        scope.setdefault("state", {})["phases"] = phases
        phases.mark("read")
        named = _named(state)

        async def send_named(message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *named]
            await send(message)

        try:
            await self.app(scope, receive, send_named)
        except Exception:  # answered 500 by Starlette's outermost layer; counted here, where the route is known
            state.metrics.error(Metrics.route_label(scope), "internal")
            raise
        phases.mark("send")
        endpoint = Metrics.route_label(scope)
        state.metrics.observe(endpoint, time.perf_counter() - start)
        state.metrics.observe_phases(endpoint, phases.spans)


def _named(state) -> list[tuple[bytes, bytes]]:
    """Headers on every response: the answering process and replica; once the engine process has left the
    port to its workers, `connection: close`, so a kept-alive client reconnects to one of them."""
    named = [(b"x-grinfer-process", state.process.encode()), (b"x-grinfer-replica", state.replica)]
    return [*named, (b"connection", b"close")] if state.left_port else named


def _admitted(path: str) -> bool:
    """The routes that go through admission: /v1/rank, /v1/recommend and KServe v2 inference."""
    return path in ADMITTED_PATHS or (path.startswith("/v2/models/") and path.endswith("/infer"))


def _has_key(headers: dict[bytes, bytes], api_key: str) -> bool:
    x_api_key, authorization = (headers.get(name, b"").decode("latin-1") for name in (b"x-api-key", b"authorization"))
    return key_accepted(api_key, x_api_key, authorization)


async def _read_body(receive, limit: int) -> bytes | None:
    """The whole request body, or None once more than `limit` bytes arrived (the rest is not read)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive):
    """A receive channel that gives the app the buffered body, then the connection's later messages."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _reply(send, status: int, message: str, field: str | None,
                 headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps({"error": message, "field": field}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})
