"""Check, before the slow part of start-up, that the ports a server will listen on are free.

A taken port is a user error: the second server must not start beside the first (for gRPC,
SO_REUSEPORT would silently split the clients between them), so the probe binds without it.
"""

from __future__ import annotations

import errno
import socket


class PortUnavailable(ValueError):
    """A port cannot be bound; the message is one line naming the setting."""


def ensure_port_free(host: str, port: int, setting: str) -> None:
    """Raise PortUnavailable naming `setting` when host:port cannot be bound right now (port 0: nothing to check).

    The probe sets SO_REUSEADDR, as uvicorn and gRPC do, so connections in TIME_WAIT do not count as taken."""
    if port == 0:
        return
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise PortUnavailable(f"host: cannot resolve {host!r} ({exc.strerror})") from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                in_use = exc.errno == errno.EADDRINUSE
                reason = "address already in use; stop the server that holds it or" if in_use else f"{exc.strerror};"
                raise PortUnavailable(f"{setting} {port}: {host}:{port}: {reason} choose another {setting}") from None
