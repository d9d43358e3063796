"""The REST front (pure ASGI): every body byte counted whatever the headers say, phases in /metrics."""

from __future__ import annotations

import re
import socket
from urllib.parse import urlsplit

import httpx
import pytest
from test_rest import NUM_ITEMS, Stack

LIMIT = 64 * 1024  # Stack's max_body_bytes


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(f"sqlite:///{tmp_path_factory.mktemp('front') / 'g.db'}", "memory://")
    yield s
    s.close()


def raw_request(url: str, head: str, body: bytes) -> tuple[int, bytes]:
    """Send bytes as they are (no client-side header fixing); the status and body of the answer."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(head.encode() + body)
        data = b""
        while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + _length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1]), data.split(b"\r\n\r\n", 1)[1]


def _length(data: bytes) -> int:
    m = re.search(rb"content-length: (\d+)", data.split(b"\r\n\r\n")[0], re.I)
    return int(m.group(1)) if m else 0


def chunked(payload: bytes, size: int = 8192) -> bytes:
    pieces = [payload[i:i + size] for i in range(0, len(payload), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def test_a_chunked_body_over_the_limit_is_refused_before_parsing(stack):
    body = b'{"user": "1", "candidates": [' + b'{"item": 1},' * (LIMIT // 10) + b'{"item": 2}]}'
    head = ("POST /v1/rank HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
            "transfer-encoding: chunked\r\nconnection: close\r\n\r\n")
    status, answer = raw_request(stack.url, head, chunked(body))
    assert status == 413 and b'"field": "body"' in answer


def test_a_small_declared_length_with_a_chunked_body_is_a_400(stack):
    """Content-Length and Transfer-Encoding together: refused (request smuggling), never parsed."""
    head = ("POST /v1/rank HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: 4\r\n"
            "transfer-encoding: chunked\r\nconnection: close\r\n\r\n")
    status, _ = raw_request(stack.url, head, chunked(b'{"user": "1", "candidates": []}' + b" " * (2 * LIMIT)))
    assert status == 400


def test_each_request_phase_is_in_the_metrics(stack):
    user = stack.service.store.list_users(1, 0)[0]
    for _ in range(3):
        r = stack.http.post("/v1/rank", json={"user": user, "candidates": [{"item": stack.raw(i)}
                                                                           for i in range(1, NUM_ITEMS + 1)]})
        assert r.status_code == 200
        assert stack.http.post("/v1/recommend", json={"user": user, "k": 3}).status_code == 200
    text = stack.http.get("/metrics").text
    counts = {(e, p): float(v) for e, p, v in re.findall(
        r'grinfer_request_phase_seconds_count\{endpoint="([^"]+)",phase="([^"]+)"\} (\S+)', text)}
    for phase in ("read", "parse", "features", "user", "engine", "respond", "encode", "send"):
        assert counts[("/v1/rank", phase)] == 3, phase
    for phase in ("read", "parse", "user", "retrieve", "engine", "respond", "encode", "send"):
        assert counts[("/v1/recommend", phase)] == 3, phase


def test_an_unhandled_error_is_a_500_counted_under_its_route(stack, monkeypatch):
    async def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(stack.service, "rank", broken)
    r = stack.http.post("/v1/rank", json={"user": "1", "candidates": [{"item": stack.raw(1)}]})
    assert r.status_code == 500
    text = httpx.get(f"{stack.url}/metrics").text  # uvicorn closes a connection whose request raised
    assert 'grinfer_errors_total{endpoint="/v1/rank",kind="internal"} 1.0' in text
