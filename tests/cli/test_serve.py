"""`grinfer serve` for real, as the README runs it: a model trained on its own data serves without --store
(the store kept for its dataset under GRINFER_HOME, beside another dataset's store), and a second server
on the same ports stops with one line."""

import os
import signal
import subprocess
import sys

import httpx
import pytest
from subprocess_util import grinfer, one_error_line

from grinfer.bench.served import wait_ready
from grinfer.config import default_store_url, preset
from grinfer.data import load_dataset
from grinfer.serving.background import free_port
from grinfer.storage import open_store
from grinfer.storage.importer import import_dataset
from grinfer.train.loop import TrainSettings
from grinfer.train.run import train_model

MODEL_DATA = "synthetic:users=20,items=60,events=15,seed=0"
OTHER_DATA = "synthetic:users=10,items=40,events=10,seed=1"  # stands in for the demo's store


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    home, model = root / "home", root / "runs" / "tiny"
    train_model(preset("mtgr-tiny"), load_dataset(MODEL_DATA), MODEL_DATA, TrainSettings(epochs=1, progress=False),
                model, validate=False)
    other = open_store(default_store_url(OTHER_DATA, home))
    import_dataset(load_dataset(OTHER_DATA), other, progress=False)
    other.close()
    port, grpc_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRINFER_")}
    env.update(GRINFER_HOME=str(home), HOME=str(root / "user"), GRINFER_LOG_LEVEL="warning")
    log = root / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "grinfer.cli", "serve",
                                 "--backend", "eager", "--model", str(model), "--port",
                                 str(port), "--grpc-port", str(grpc_port), "--device", "cpu"], env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url, 180, lambda: f"its output:\n{log.read_text()[-3000:]}", poll_s=0.2)
        yield {"url": url, "port": port, "grpc_port": grpc_port, "home": home, "root": root, "model": model}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_a_trained_model_serves_on_its_own_store_under_grinfer_home(served):
    users = httpx.get(f"{served['url']}/v1/users", params={"limit": 1000}, timeout=10).json()["users"]
    assert len(users) == 20  # the model's dataset, not the other store's 10 users
    r = httpx.post(f"{served['url']}/v1/recommend", json={"user": users[0], "k": 3}, timeout=30)
    assert r.status_code == 200 and len(r.json()["items"]) == 3
    stores = sorted(p.name for p in (served["home"] / "stores").iterdir() if p.suffix == ".db")
    assert len(stores) == 2 and any(name.startswith("synthetic-users-20-items-60-") for name in stores)
    assert not (served["root"] / "user").exists()  # nothing written outside GRINFER_HOME


@pytest.mark.parametrize("flag", ["--port", "--grpc-port"])
def test_a_second_server_on_the_same_ports_stops_with_one_line(served, flag):
    ports = {"--port": served["port"], "--grpc-port": served["grpc_port"]}
    ports = {f: p if f == flag else free_port() for f, p in ports.items()}
    proc = grinfer("serve",
                   "--backend", "eager", "--model", str(served["model"]), *(str(x) for kv in ports.items() for x in kv),
                   home=served["home"], timeout=60)
    assert f"{flag} {ports[flag]}: 127.0.0.1:{ports[flag]}: address already in use" in one_error_line(proc)
