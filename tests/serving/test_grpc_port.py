"""gRPC binds its port alone: a second server on the same port fails instead of splitting the clients
(no SO_REUSEPORT), unless both ask to share it (grpc_reuse_port)."""

import pytest
from test_grpc import Stack

from grinfer.serving.grpc_server import start_grpc_server


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("grpc-port") / "grinfer.db", start_engine=False)
    yield s
    s.close()


def test_a_second_server_on_the_same_port_fails(stack):
    with pytest.raises(OSError, match=f"cannot bind 127.0.0.1:{stack.server.port}"):
        start_grpc_server(stack.service, stack.metrics, "127.0.0.1", stack.server.port)


def test_servers_that_ask_for_it_share_the_port(stack):
    first = start_grpc_server(stack.service, stack.metrics, "127.0.0.1", 0, reuse_port=True)
    try:
        second = start_grpc_server(stack.service, stack.metrics, "127.0.0.1", first.port, reuse_port=True)
        assert second.port == first.port
        second.stop(grace=0).wait(10)
    finally:
        first.stop(grace=0).wait(10)
