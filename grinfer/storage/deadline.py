"""Client-side deadlines for database calls: a hung server (SIGSTOP, a frozen host) answers nothing.

PostgreSQL's statement_timeout is enforced by the server, so a server that is stopped never fires it;
the kernel still acknowledges TCP, so keepalives and tcp_user_timeout do not notice either, and a call
waits for as long as the server is stopped. `Watchdog.guard(socket_fd, seconds)` arms a deadline for
the call made inside it; one thread shuts down the socket of every call that overran its deadline,
and libpq then fails that call at once (an OperationalError: the store's outage path, a JSON 503).
The connection is broken afterwards, so its pool discards it.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("grinfer.storage")


class Watchdog:
    """Shuts down the sockets of calls past their deadline (one daemon thread, started on first use)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.expired = 0  # calls cut short so far
        self._armed: dict[int, int] = {}  # token -> socket fd, while its call runs
        self._deadlines: list[tuple[float, int]] = []  # (deadline, token), a heap
        self._tokens = itertools.count()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    @contextmanager
    def guard(self, fd: int, seconds: float | None) -> Iterator[None]:
        """Run the block with socket `fd` shut down if it is still running after `seconds` (None or 0: no
        deadline)."""
        if not seconds:
            yield
            return
        token = next(self._tokens)
        with self._wake:
            self._armed[token] = fd
            heapq.heappush(self._deadlines, (time.monotonic() + seconds, token))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"{self.name}-watchdog", daemon=True)
                self._thread.start()
            self._wake.notify()
        try:
            yield
        finally:
            with self._wake:  # under the lock: the watchdog never shuts a socket down after this
                self._armed.pop(token, None)

    def _run(self) -> None:
        with self._wake:
            while True:
                while self._deadlines and self._deadlines[0][1] not in self._armed:
                    heapq.heappop(self._deadlines)  # finished in time
                if not self._deadlines:
                    self._wake.wait()
                    continue
                deadline, token = self._deadlines[0]
                wait = deadline - time.monotonic()
                if wait > 0:
                    self._wake.wait(wait)
                    continue
                heapq.heappop(self._deadlines)
                self._shut(self._armed.pop(token))

    def _shut(self, fd: int) -> None:
        self.expired += 1
        try:
            with socket.socket(fileno=socket.dup(fd)) as sock:  # shutdown acts on the socket, not the descriptor
                sock.shutdown(socket.SHUT_RDWR)
        except OSError as exc:  # already closed: the call is over anyway
            log.debug("%s: could not shut down an overrunning call's socket: %s", self.name, exc)
            return
        log.warning("%s: a call overran its deadline; its connection was shut down", self.name)
