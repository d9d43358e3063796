"""`grinfer bench --protocol triton` against a real tritonserver serving the exported repository
(`grinfer export triton-repo`), with the users and items of a grinfer server over the same checkpoint and
store: every request the load sends is answered by the ensemble."""

from __future__ import annotations

import pytest
from tritonserver_env import TritonServer, triton_env_or_skip
from typer.testing import CliRunner

from grinfer.bench.load import run_load
from grinfer.cli import app
from grinfer.config import ServerConfig
from grinfer.serving.app import create_app
from grinfer.serving.background import BackgroundServer
from grinfer.serving.server import build_server


@pytest.fixture(scope="module")
def pair(served_checkpoint, tmp_path_factory):
    """(grinfer's REST URL, tritonserver's HTTP URL) over one checkpoint and store."""
    env = triton_env_or_skip()
    tmp = tmp_path_factory.mktemp("triton-bench")
    store = f"sqlite:///{tmp / 'store.db'}"
    result = CliRunner().invoke(app, ["export", "triton-repo", "--model", str(served_checkpoint), "--out",
                                      str(tmp / "repo"), "--store", store])
    assert result.exit_code == 0, result.output
    built = build_server(ServerConfig(store=store), served_checkpoint, "cpu")
    try:
        with BackgroundServer(create_app(built.state)) as url, \
                TritonServer(env, tmp / "repo", tmp / "tritonserver.log") as triton:
            yield url, f"http://{triton.http_url}"
    finally:
        built.close()


def test_the_triton_protocol_is_answered_by_the_exported_ensemble(pair):
    url, triton = pair
    (level,) = run_load(url, [2], endpoint="rank", requests=10, duration_s=120, candidates=5, protocol="triton",
                        triton_url=triton)
    assert level.ok == 10 and level.errors == {}, level.errors
    with pytest.raises(ValueError, match="only loopback"):
        run_load(url, [1], endpoint="rank", requests=1, protocol="triton", triton_url="http://203.0.113.9:8000")
