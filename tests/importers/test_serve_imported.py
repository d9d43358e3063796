"""`grinfer import-checkpoint` then `grinfer serve --model DIR` for real: an imported generative-recommenders
checkpoint beside a native ranking checkpoint retrieves the candidates /v1/recommend ranks, as a native one does;
the CLI's errors are one line."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from gr_util import gr_state_dict

from grinfer.bench.served import wait_ready
from grinfer.data import load_dataset
from grinfer.features.featurizer import retrieval_batch
from grinfer.model.checkpoint import load_checkpoint, read_checkpoint_meta
from grinfer.serving.background import free_port

sys.path.insert(0, str(Path(__file__).parents[1] / "cli"))  # the CLI tests' subprocess helpers
from subprocess_util import grinfer, one_error_line

SETS = ["--set", "num_heads=2", "--set", "qk_dim=3", "--set", "v_dim=2"]


@pytest.fixture(scope="module")
def imported(tmp_path_factory, served_checkpoint):
    root = tmp_path_factory.mktemp("imported")
    spec = read_checkpoint_meta(served_checkpoint)["training"]["data"]
    ds = load_dataset(spec)
    src = root / "hstu_ep100"
    torch.save({"epoch": 100, "model_state_dict": gr_state_dict(num_items=int(ds.catalog.raw_ids.max()))}, src)
    model_dir = root / "model"
    shutil.copytree(served_checkpoint, model_dir / "ranking")
    proc = grinfer("import-checkpoint", "--format", "generative-recommenders", str(src), "--out",
                   str(model_dir / "retrieval"), *SETS, "--data", spec, home=root / "home")
    assert proc.returncode == 0, proc.stderr
    return {"root": root, "src": src, "model": model_dir, "ds": ds}


def _expected_top(model, items: np.ndarray, ts: np.ndarray, n: int) -> set[int]:
    """The imported model's n best unseen items, computed here from the user's history."""
    window = model.cfg.max_seq_len
    with torch.no_grad():
        scores = model.user_embedding(retrieval_batch([(items[-window:], ts[-window:])], False))[0] \
            @ model.item_table().T
    scores[0] = -torch.inf
    scores[torch.as_tensor(np.unique(items))] = -torch.inf
    return set(torch.topk(scores, n).indices.tolist())


def test_an_imported_checkpoint_retrieves_for_the_server(imported):
    root = imported["root"]
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRINFER_")}
    env.update(GRINFER_HOME=str(root / "home"), GRINFER_LOG_LEVEL="warning")
    log = root / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "grinfer.cli", "serve",
                                 "--backend", "eager", "--model", str(imported["model"]),
                                 "--port", str(port), "--grpc-port", "0", "--device", "cpu"], env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url, 180, lambda: f"its output:\n{log.read_text()[-3000:]}", poll_s=0.2)
        retriever = load_checkpoint(imported["model"] / "retrieval")
        assert retriever.cfg.time_bias_from == "next" and retriever.cfg.attn_alpha == 1.0
        for user in imported["ds"].users[:4]:
            r = httpx.post(f"{url}/v1/recommend", json={"user": str(user.user_id), "k": 5, "retrieve": 5}, timeout=30)
            assert r.status_code == 200, r.text
            got = {item["item"] for item in r.json()["items"]}  # raw ids; the synthetic catalogue's are dense ids
            assert got == _expected_top(retriever, user.items, user.timestamps, 5)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_import_errors_are_one_line(imported, tmp_path):
    src = str(imported["src"])
    line = one_error_line(grinfer("import-checkpoint", src, "--out", str(tmp_path / "a")))
    assert "num_heads: not recorded in the checkpoint" in line and "--gin" in line
    line = one_error_line(grinfer("import-checkpoint", src, "--out", str(tmp_path / "b"), *SETS, "--set", "bogus=1"))
    assert "bogus" in line
    line = one_error_line(grinfer("import-checkpoint", "--format", "onnx", src, "--out", str(tmp_path / "c")))
    assert "unknown format 'onnx'" in line
    line = one_error_line(grinfer("import-checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "d"), *SETS))
    assert "no file" in line


def test_serve_refuses_a_retriever_over_another_catalogue(imported, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(imported["model"] / "ranking", model / "ranking")
    src = tmp_path / "bigger"
    torch.save(gr_state_dict(num_items=int(imported["ds"].catalog.raw_ids.max()) + 5), src)
    proc = grinfer("import-checkpoint", str(src), "--out", str(model / "retrieval"), *SETS,
                   home=tmp_path / "home")  # no --data: the table keeps its rows, 5 more than the catalogue
    assert proc.returncode == 0, proc.stderr
    port = free_port()
    proc = grinfer("serve", "--backend", "eager", "--model", str(model), "--port", str(port), "--grpc-port", "0",
                   "--device", "cpu", home=tmp_path / "home", timeout=120)
    assert "scores" in proc.stderr and "items but" in proc.stderr and "--data" in proc.stderr, proc.stderr
