"""A port that is taken stops `grinfer serve` at once: one line, exit 2, for the REST and the gRPC port."""

import socket

import pytest
from subprocess_util import grinfer, one_error_line

from grinfer.serving.background import free_port
from grinfer.serving.ports import PortUnavailable, ensure_port_free


@pytest.fixture
def listener():
    """A socket listening on a free loopback port (what another server would hold)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize("flag", ["--port", "--grpc-port"])
def test_serve_on_a_taken_port_is_one_line_and_exit_2(listener, flag, tmp_path):
    other = "--grpc-port" if flag == "--port" else "--port"
    proc = grinfer("serve", flag, str(listener), other, str(free_port()), home=tmp_path, timeout=60)
    line = one_error_line(proc)
    assert f"{flag} {listener}: 127.0.0.1:{listener}: address already in use" in line
    assert not (tmp_path / "stores").exists()  # it stopped before any start-up work


def test_free_ports_and_port_zero_pass(listener):
    ensure_port_free("127.0.0.1", free_port(), "--port")
    ensure_port_free("127.0.0.1", 0, "--grpc-port")  # 0 = off / any port
    with pytest.raises(PortUnavailable, match="--port"):
        ensure_port_free("127.0.0.1", listener, "--port")


def test_an_unknown_host_is_a_clear_error():
    with pytest.raises(PortUnavailable, match="host: cannot resolve"):
        ensure_port_free("no-such-host.invalid", 8000, "--port")
