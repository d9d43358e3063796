"""What every balancer configuration is generated from: the replicas, the listening addresses, the policy."""

from __future__ import annotations

import re
from dataclasses import dataclass

POLICIES = ("hash", "round-robin")  # round-robin: only to measure what affinity is worth
_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)$")

# requests a balancer may send to another replica when the connection to the first failed (never a write)
RETRYABLE_PATHS = ("/v1/rank", "/v1/recommend")
WRITE_PATHS = ("/v1/events", "/v1/admin/roll-history")
USER_HEADER = "X-User-Id"
READY_PATH = "/readyz"


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Plan:
    """A balancer in front of `replicas` (REST) and, when given, `grpc_replicas` (same order, same replicas)."""

    replicas: tuple[Address, ...]
    listen: Address
    grpc_replicas: tuple[Address, ...] = ()
    grpc_listen: Address | None = None
    policy: str = "hash"
    admin: Address | None = None  # the balancer's own stats/admin endpoint (Envoy admin, HAProxy stats)

    @property
    def affine(self) -> bool:
        return self.policy == "hash"

    @property
    def grpc(self) -> bool:
        return bool(self.grpc_replicas) and self.grpc_listen is not None


def parse_address(text: str, flag: str) -> Address:
    """HOST:PORT (a bracketed IPv6 host allowed); ValueError naming `flag` otherwise."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not _HOST.match(host) or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{flag}: expected HOST:PORT with a port 1-65535, got {text.strip()!r}")
    return Address(host, int(port))


def parse_addresses(spec: str, flag: str) -> tuple[Address, ...]:
    """'HOST:PORT,HOST:PORT,...' -> addresses (at least one, no repeats)."""
    parts = [p for p in spec.split(",") if p.strip()]
    if not parts:
        raise ValueError(f"{flag}: give at least one HOST:PORT")
    out = tuple(parse_address(p, flag) for p in parts)
    if len(set(out)) != len(out):
        raise ValueError(f"{flag}: a replica is listed twice")
    return out


def make_plan(replicas: str, listen: str, grpc_replicas: str | None = None, grpc_listen: str | None = None,
              policy: str = "hash", admin: str | None = None) -> Plan:
    """A Plan from the command's flags (ValueError naming the flag that is wrong)."""
    if policy not in POLICIES:
        raise ValueError(f"--policy: expected one of {', '.join(POLICIES)}, got {policy!r}")
    rest = parse_addresses(replicas, "--replicas")
    grpc = parse_addresses(grpc_replicas, "--grpc-replicas") if grpc_replicas else ()
    if grpc and len(grpc) != len(rest):
        raise ValueError(f"--grpc-replicas: {len(grpc)} given for {len(rest)} --replicas; list each replica's "
                         "gRPC address in the same order")
    if grpc and grpc_listen is None:
        raise ValueError("--grpc-listen: needed with --grpc-replicas (the address gRPC clients connect to)")
    return Plan(rest, parse_address(listen, "--listen"), grpc,
                parse_address(grpc_listen, "--grpc-listen") if grpc_listen else None, policy,
                parse_address(admin, "--admin") if admin else None)
