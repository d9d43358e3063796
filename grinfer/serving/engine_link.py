"""The engine over a local socket: front-end worker processes feed the one engine process.

One Python process cannot both parse thousands of HTTP requests a second and keep a GPU busy (they
share one GIL), so `grinfer serve --workers N` runs N front-end processes (HTTP, validation, store
reads, featurizing, JSON) that send engine requests to the engine process over a Unix socket. The engine
stays one per device, so a user's K/V live in one place whichever worker took the request.

    EngineHost(engine, path)   in the engine process: one thread per worker connection
    EngineClient(path)         in a worker: the `Engine` interface the service and metrics use

Messages are pickled tuples on `multiprocessing.connection` (length-prefixed frames):
worker -> engine `(id, op, args)`, engine -> worker `(id, ok, value)`; ops are rank, retrieve, health, stats
and listening (a worker saying it serves the shared port). A worker's health asks with the number of workers:
until that many have said they listen (and the engine process has opened its own app and left the port,
which `on_listening` does for the last of them) the answer is "starting", so no worker's /readyz says 200
while a connection the kernel hands to the engine process could still meet its start-up gate's 503.
They are pickled with the plain pickler, torch tensors as numpy arrays (`dumps`/`loads`): the connection's
own pickler would hand each tensor over as shared memory through a file descriptor, a socket round trip
to the sender's resource-sharer thread per tensor (a profile of the H200 server showed that thread and the
fd passing as the engine process's largest cost after the steps themselves).
"""

from __future__ import annotations

import asyncio
import io
import itertools
import logging
import pickle
import threading
from collections.abc import Callable
from concurrent.futures import Future
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path

import torch

from grinfer.engine import Engine
from grinfer.engine.request import EngineError
from grinfer.serving.engine_set import EngineSet
from grinfer.serving.models import ModelSet

log = logging.getLogger("grinfer.serve")


_NO_NUMPY_TWIN = {torch.bfloat16: torch.int16}  # dtypes numpy lacks, sent as their bits


def _tensor(array, dtype: torch.dtype | None = None) -> torch.Tensor:
    t = torch.from_numpy(array)
    return t if dtype is None else t.view(dtype)


class _Pickler(pickle.Pickler):
    """Pickles torch tensors as numpy arrays (bytes in the frame, no shared memory or descriptors)."""

    def reducer_override(self, obj):
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu()
            bits = _NO_NUMPY_TWIN.get(t.dtype)
            return (_tensor, (t.numpy(),)) if bits is None else (_tensor, (t.contiguous().view(bits).numpy(), t.dtype))
        return NotImplemented


def dumps(obj) -> bytes:
    """One link message as bytes."""
    buf = io.BytesIO()
    _Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


def loads(data: bytes):
    """A link message from its bytes."""
    return pickle.loads(data)


class EngineHost:
    """Serves an Engine to worker processes on a Unix socket (one thread per connection)."""

    def __init__(self, engine: Engine | EngineSet | ModelSet,
                 path: Path, on_listening: Callable[[int], None] | None = None):
        self.engine, self.path, self.on_listening = engine, path, on_listening
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        self.listener = Listener(str(path), family="AF_UNIX")
        self.info = {"model_config": engine.model_config, "has_retriever": engine.has_retriever}
        self._listened: set[int] = set()  # workers whose `listening` has been handled (on_listening returned)
        self._closed = False
        threading.Thread(target=self._accept, name="grinfer-engine-host", daemon=True).start()

    def close(self) -> None:
        self._closed = True
        self.listener.close()
        self.path.unlink(missing_ok=True)

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn = self.listener.accept()
            except OSError:  # closed
                return
            conn.send_bytes(dumps(self.info))
            threading.Thread(target=self._serve, args=(conn,), name="grinfer-engine-link", daemon=True).start()

    def _serve(self, conn: Connection) -> None:
        lock = threading.Lock()  # engine-thread callbacks and this thread both send

        def reply(request_id: int, ok: bool, value) -> None:
            with lock:
                try:
                    conn.send_bytes(dumps((request_id, ok, value)))
                except (OSError, ValueError):  # the worker went away: nothing to tell it
                    pass

        def forward(request_id: int, future: Future) -> None:
            exc = future.exception()
            reply(request_id, exc is None, future.result() if exc is None else _portable(exc))

        while True:
            try:
                request_id, op, args = loads(conn.recv_bytes())
            except (EOFError, OSError):
                conn.close()
                return
            try:
                self._run(op, args, request_id, reply, forward)
            except Exception as exc:  # Overloaded, ContextTooLarge, ValueError at submit: the caller's error
                reply(request_id, False, _portable(exc))

    def _run(self, op: str, args: tuple, request_id: int, reply, forward) -> None:
        """One op: engine work answers through `forward` when its future is done, the rest at once."""
        if op in ("rank", "retrieve"):
            submit = self.engine.submit if op == "rank" else self.engine.submit_retrieval
            submit(*args).add_done_callback(lambda f: forward(request_id, f))
        elif op == "health":  # args: the number of workers that must listen first (none: the engine alone)
            reply(request_id, True, self.engine.health() or self._handover(*args))
        elif op == "stats":
            reply(request_id, True, self.engine.stats())
        elif op == "listening":  # worker N serves the shared port now
            reply(request_id, True, None)
            if self.on_listening is not None:
                self.on_listening(*args)
            self._listened.add(args[0])
        else:
            reply(request_id, False, EngineError(f"unknown engine op {op!r}"))


    def _handover(self, workers: int = 0) -> str | None:
        """Why a worker is not ready yet: fewer than `workers` have been handled as listening."""
        listening = len(self._listened)
        return None if listening >= workers else f"starting the front-end workers ({listening} of {workers} listen)"


def _portable(exc: BaseException) -> BaseException:
    """The exception itself when it pickles (engine errors, ValueError), else an EngineError saying what it was."""
    if isinstance(exc, (EngineError, ValueError)):
        return exc
    return EngineError(f"{type(exc).__name__}: {exc}")


class EngineClient:
    """The Engine interface of a worker process, answered by the engine process's EngineHost."""

    def __init__(self, path: Path, timeout_s: float = 30.0, workers: int = 0):
        """`workers`: how many front-end workers must listen before `health` says this one serves."""
        self.workers = workers
        self.conn = Client(str(path), family="AF_UNIX")
        if not self.conn.poll(timeout_s):
            raise EngineError(f"engine at {path} did not answer within {timeout_s} s")
        info = loads(self.conn.recv_bytes())
        self.model_config, self.has_retriever = info["model_config"], info["has_retriever"]
        self._ids = itertools.count()
        self._pending: dict[int, Future] = {}
        self._send_lock = threading.Lock()
        self._alive = True
        threading.Thread(target=self._receive, name="grinfer-engine-client", daemon=True).start()

    @property
    def running(self) -> bool:
        return self._alive

    def call(self, op: str, *args) -> Future:
        """Send one op; the future resolves to the engine's answer (or raises its error)."""
        future: Future = Future()
        request_id = next(self._ids)
        self._pending[request_id] = future
        try:
            with self._send_lock:
                self.conn.send_bytes(dumps((request_id, op, args)))
        except (OSError, ValueError) as exc:
            self._pending.pop(request_id, None)
            raise EngineError(f"the engine process is gone ({exc})") from None
        return future

    async def rank(self, request):
        """Score a RankRequest in the engine process (awaitable)."""
        return await asyncio.wrap_future(self.call("rank", request))

    async def retrieve(self, context, n: int, user: str | None = None, version: int = 0):
        """Top-n unseen items, computed in the engine process (the user's history K/V cached there)."""
        return await asyncio.wrap_future(self.call("retrieve", context, n, user, version))

    def health(self, timeout_s: float = 5.0) -> str | None:
        """None when the engine serves; else why not (a gone engine process included)."""
        if not self._alive:
            return "the engine process is gone"
        try:
            return self.call("health", self.workers).result(timeout_s)
        except Exception as exc:
            return f"engine unreachable: {exc}"

    def stats(self, timeout_s: float = 5.0) -> dict:
        """The engine's stats (as Engine.stats)."""
        return self.call("stats").result(timeout_s)

    def close(self) -> None:
        self._alive = False
        self.conn.close()

    def _receive(self) -> None:
        while True:
            try:
                request_id, ok, value = loads(self.conn.recv_bytes())
            except (EOFError, OSError):
                break
            future = self._pending.pop(request_id, None)
            if future is None:
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
        self._alive = False
        for future in list(self._pending.values()):
            if not future.done():
                future.set_exception(EngineError("the engine process is gone"))
        self._pending.clear()
