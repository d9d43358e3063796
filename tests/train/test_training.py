"""A tiny training run lowers the loss; train_model writes a loadable checkpoint with metrics and a plot."""

import json

import pytest
import torch

import grinfer
from grinfer.config import preset
from grinfer.data import generate_synthetic
from grinfer.features import Featurizer
from grinfer.model import build_model
from grinfer.train.loop import TrainSettings
from grinfer.train.ranking import evaluate_ranking, train_ranking
from grinfer.train.retrieval import evaluate_retrieval, train_retrieval
from grinfer.train.run import config_for, train_model


@pytest.fixture(scope="module")
def ds():
    return generate_synthetic(num_users=80, num_items=120, mean_events=30, seed=2)


def test_ranking_training_lowers_loss(ds):
    torch.manual_seed(0)
    cfg = config_for(preset("mtgr-tiny"), ds)
    model = build_model(cfg)
    history = train_ranking(model, ds, Featurizer(ds.catalog, cfg.num_time_buckets),
                            TrainSettings(epochs=4, batch_size=32, lr=3e-3, progress=False), validate=False).history
    losses = [h["loss"] for h in history]
    assert losses[-1] < losses[0] - 0.02, losses
    metrics = evaluate_ranking(model, ds, Featurizer(ds.catalog, cfg.num_time_buckets))
    assert set(metrics) == {"ctr", "ctcvr", "candidates"}
    assert 0.0 <= metrics["ctr"]["auc"] <= 1.0 and 0.0 <= metrics["ctr"]["gauc"] <= 1.0


def test_retrieval_training_lowers_loss(ds):
    torch.manual_seed(0)
    cfg = config_for(preset("hstu-ml1m").model_copy(update={"max_seq_len": 32, "dropout": 0.0}), ds)
    model = build_model(cfg)
    history = train_retrieval(model, ds, TrainSettings(epochs=4, batch_size=32, lr=3e-3, num_negatives=32,
                                                       progress=False), validate=False).history
    losses = [h["loss"] for h in history]
    assert losses[-1] < losses[0] - 0.1, losses
    metrics = evaluate_retrieval(model, ds, "test")
    assert metrics["users"] == len(ds.users)
    assert metrics["hr@10"] <= metrics["hr@50"] <= metrics["hr@200"]


def test_train_model_writes_checkpoint_metrics_and_plot(ds, tmp_path):
    record = train_model(preset("mtgr-tiny"), ds, "synthetic:users=80", TrainSettings(epochs=1, progress=False),
                         tmp_path / "ckpt")
    out = tmp_path / "ckpt"
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "metrics.json", "loss.png"}
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["ranking"]["ctr"]["auc"] == pytest.approx(record["ranking"]["ctr"]["auc"])
    assert len(saved["history"]) == 1
    model = grinfer.load(out)
    assert model.cfg.num_items == ds.catalog.num_items
