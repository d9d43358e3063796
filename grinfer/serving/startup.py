"""Listening before ready: the REST port answers while the server prepares (demo models, loading, warm-up).

`StartupGate` is the ASGI app uvicorn serves from its first second. Until the real application is handed
to it, it answers `/healthz` 200, `/readyz` 503 with what the server is doing and how far it is
(`{"status": "training demo models", "progress": 0.4}`), `/` a page that shows the same and reloads when
ready, and every other path 503 with `Retry-After`; from then on it forwards everything to the real app.
It also owns the lifespan: shutdown runs the server's close hook (drain the engine, close storage).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

RETRY_AFTER_S = 2


@dataclass
class Preparation:
    """What the server is doing before it is ready (shared by the preparing thread and the gate)."""

    status: str = "starting"
    progress: float = 0.0  # 0..1, a rough fraction of the start-up work done
    error: str | None = None  # set when preparation failed: the server exits with this message
    started: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def update(self, status: str, progress: float) -> None:
        with self._lock:
            self.status, self.progress = status, max(self.progress, min(progress, 1.0))

    def snapshot(self) -> dict:
        with self._lock:
            out = {"status": self.status, "progress": round(self.progress, 3),
                   "elapsed_s": round(time.monotonic() - self.started, 1)}
            if self.error is not None:
                out["error"] = self.error
            return out


_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>grinfer is starting</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{font:16px system-ui,sans-serif;max-width:36rem;margin:3rem auto;padding:0 1rem;color:#222}
progress{width:100%;height:1.2rem}</style></head><body><h1>grinfer is starting</h1>
<p id="status">starting</p><progress id="bar" max="1" value="0"></progress>
<p>This page reloads when the server is ready.</p><script>
async function poll() {
  try {
    const r = await fetch("/readyz");
    const body = await r.json();
    if (r.ok) { location.reload(); return; }
    document.getElementById("status").textContent = body.status + (body.error ? ": " + body.error : "");
    document.getElementById("bar").value = body.progress || 0;
  } catch (e) {}
  setTimeout(poll, 1000);
}
poll();
</script></body></html>"""


class StartupGate:
    """ASGI app answering for the server until `open(app)` hands it the real application."""

    def __init__(self, prep: Preparation, on_shutdown: Callable[[], None] | None = None):
        self.prep, self.on_shutdown = prep, on_shutdown
        self.app = None

    def open(self, app) -> None:
        """From now on every request goes to `app`."""
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif self.app is not None:
            await self.app(scope, receive, send)
        elif scope["type"] == "http":
            await self._preparing(scope, send)

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.on_shutdown is not None:
                    await asyncio.to_thread(self.on_shutdown)
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _preparing(self, scope, send) -> None:
        path = scope["path"]
        if path == "/healthz":
            await _respond(send, 200, {"status": "ok"})
        elif path == "/":
            await _respond(send, 200, _PAGE.encode(), "text/html; charset=utf-8")
        else:
            body = self.prep.snapshot()
            if path != "/readyz":
                body = {"error": f"server is not ready: {body['status']}", "field": None, **body}
            await _respond(send, 503, body, headers=[(b"retry-after", str(RETRY_AFTER_S).encode())])


async def _respond(send, status: int, body: dict | bytes, content_type: str = "application/json",
                   headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type.encode()), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})
