"""The grinfer command end to end on small synthetic data: train both, eval to JSON, demo, bad input."""

import importlib.util
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from grinfer.cli import app
from grinfer.config import ServerConfig
from grinfer.storage import open_store

DATA = "synthetic:users=40,items=60,events=20,seed=4"
runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("both")
    result = runner.invoke(app, ["train", "--data", DATA, "--task", "both", "--preset", "mtgr-tiny",
                                 "--set", "max_seq_len=64", "--epochs", "1", "--batch-size", "16",
                                 "--out", str(out), "--device", "cpu", "--no-validate"])
    assert result.exit_code == 0, result.output
    return out


def test_train_both_writes_two_checkpoints(trained):
    assert (trained / "ranking" / "config.json").is_file()
    assert (trained / "retrieval" / "model.safetensors").is_file()


def test_eval_writes_the_documented_json_shape(trained, tmp_path):
    out = tmp_path / "eval.json"
    result = runner.invoke(app, ["eval", "--model", str(trained), "--data", DATA, "--json", str(out),
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert {"hr@10", "ndcg@10", "hr@50", "ndcg@50", "hr@200", "ndcg@200"} <= set(data["retrieval"])
    assert set(data["ranking"]["ctr"]) == {"auc", "gauc"} and set(data["ranking"]["ctcvr"]) == {"auc", "gauc"}
    assert "GAUC" in result.output and "hr@10" in result.output


def test_demo_prints_history_and_recommendations(trained):
    result = runner.invoke(app, ["demo", "--model", str(trained), "--users", "2", "--k", "5", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert result.output.count("top-5 recommendations") == 2
    assert "recent history" in result.output


@pytest.mark.parametrize("args, message", [
    (["train", "--out", "x", "--task", "nope"], "--task"),
    (["train", "--out", "x", "--preset", "mtgr-huge"], "preset"),
    (["train", "--out", "x", "--set", "d_model=63", "--preset", "mtgr-tiny"], "d_model"),
    (["train", "--out", "x", "--data", "/no/such/dir"], "/no/such/dir"),
    (["eval", "--model", "/no/such/ckpt"], "/no/such/ckpt"),
])
def test_bad_input_gives_a_clear_error(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output


def test_eval_defaults_to_the_models_own_dataset(trained):
    result = runner.invoke(app, ["eval", "--model", str(trained), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "GAUC" in result.output


@pytest.mark.parametrize("command", ["eval", "demo"])
def test_a_dataset_the_model_cannot_score_is_one_error_line(trained, command):
    other = "synthetic:users=40,items=80,events=20,seed=4"
    result = runner.invoke(app, [command, "--model", str(trained), "--data", other, "--device", "cpu"])
    assert result.exit_code == 2
    assert f"--data {other}: the model in {trained}" in result.output
    assert "it has 80 items but the model was trained on 60" in result.output and DATA in result.output
    assert "hr@10" not in result.output and "recommendations" not in result.output  # no metrics, no list


def test_import_movielens_defaults_to_the_store_serve_uses_for_that_directory(tmp_path):
    spec = importlib.util.spec_from_file_location("readme_util", Path(__file__).parents[1] / "docs" / "readme_util.py")
    readme_util = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(readme_util)
    ml = readme_util.write_movielens(tmp_path / "ml", users=5, movies=20, per_user=4)
    home = tmp_path / "home"
    result = runner.invoke(app, ["import-movielens", str(ml)], env={"GRINFER_HOME": str(home)})
    assert result.exit_code == 0, result.output
    url = ServerConfig(home=str(home)).with_store_for(str(ml), tmp_path / "runs" / "ml").store
    assert url in result.output
    store = open_store(url)
    try:
        assert store.count_users() == 5 and store.load_catalog().num_items == 20
    finally:
        store.close()
