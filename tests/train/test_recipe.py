"""The default recipe: early stopping on the validation metric with the best epoch's weights kept and named in
metrics.json, learning-rate warm-up/decay, per-preset defaults, the time estimate, the ranking validation window."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from grinfer.config import preset
from grinfer.data import generate_synthetic
from grinfer.model.checkpoint import load_checkpoint
from grinfer.train.loop import MIN_LR_RATIO, TrainSettings, fit, lr_factor, param_groups
from grinfer.train.ranking import ContextLimits, evaluation_requests, training_requests, validation_cut, window
from grinfer.train.recipe import RANKING_RECIPE, RETRIEVAL_RECIPE, settings_for
from grinfer.train.run import train_model


def _scripted_fit(scores: list[float], patience: int):
    """fit() on a one-parameter model whose 'validation metric' follows `scores`; the parameter records the epoch."""
    model = torch.nn.Linear(1, 1, bias=False)

    def batches(epoch):
        yield epoch

    def loss_fn(m, epoch):
        return (m.weight * 0).sum()  # lr 0: the step changes nothing; on_epoch stamps the epoch into the weight

    def on_epoch(epoch, loss):
        with torch.no_grad():
            model.weight.fill_(epoch + 1.0)
        return {"valid_metric": scores[epoch]}

    settings = TrainSettings(epochs=len(scores), patience=patience, lr=0.0, progress=False)
    return model, fit(model, batches, loss_fn, settings, "test", 1, on_epoch, "valid_metric")


def test_early_stopping_keeps_the_best_epochs_weights():
    model, result = _scripted_fit([0.1, 0.3, 0.2, 0.25, 0.2, 0.9], patience=3)
    assert result.best_epoch == 2 and result.best_value == 0.3 and result.stopped_early
    assert len(result.history) == 5  # epochs 3, 4, 5 brought nothing better: stopped before epoch 6
    assert model.weight.item() == 2.0  # epoch 2's weights were restored


def test_without_patience_every_epoch_runs_and_the_best_is_still_kept():
    model, result = _scripted_fit([0.1, 0.3, 0.2, 0.25, 0.2, 0.29], patience=0)
    assert len(result.history) == 6 and not result.stopped_early
    assert result.best_epoch == 2 and model.weight.item() == 2.0


def test_learning_rate_warm_up_then_cosine_decay():
    s = TrainSettings(lr=1.0, warmup_steps=10, decay="cosine", epochs=10)
    total = 110
    assert lr_factor(0, s, total) == pytest.approx(0.1)
    assert lr_factor(9, s, total) == pytest.approx(1.0)
    assert lr_factor(60, s, total) == pytest.approx(MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5)  # half-way
    assert lr_factor(110, s, total) == pytest.approx(MIN_LR_RATIO)
    short = TrainSettings(lr=1.0, warmup_steps=200, decay="cosine")  # 30 steps in all: warm-up capped at 6
    assert [lr_factor(i, short, 30) for i in (0, 5)] == [pytest.approx(1 / 6), 1.0]
    flat = TrainSettings(lr=1.0)
    assert [lr_factor(i, flat, total) for i in (0, 50, 109)] == [1.0, 1.0, 1.0]


def test_group_layer_norm_parameters_get_their_own_learning_rate():
    from grinfer.model import build_model

    model = build_model(preset("mtgr-tiny"))
    groups = param_groups(model, TrainSettings(lr=1e-3, group_lr_scale=10.0))
    assert [g["lr"] for g in groups] == [1e-3, 1e-2]
    assert sum(p.numel() for p in groups[1]["params"]) == 2 * 2 * 2 * 4 * 32  # 2 layers x 2 norms x w,b x 4 groups
    plain = build_model(preset("mtgr-tiny").replace(group_ln=False))
    assert len(param_groups(plain, TrainSettings(group_lr_scale=10.0))) == 1


def test_per_preset_defaults_and_explicit_flags_win():
    s = settings_for("hstu-ml1m", "hstu")
    assert (s.epochs, s.patience, s.lr) == (RETRIEVAL_RECIPE["epochs"], RETRIEVAL_RECIPE["patience"],
                                            RETRIEVAL_RECIPE["lr"])
    assert settings_for("mtgr-tiny", "mtgr").lr == 1e-3
    r = settings_for("mtgr-small", "mtgr", lr=None, epochs=3)
    assert r.epochs == 3 and r.lr == RANKING_RECIPE["lr"] and r.decay == RANKING_RECIPE["decay"]
    with pytest.raises(ValueError, match="bogus: not a training setting"):
        settings_for("mtgr-small", "mtgr", bogus=1)


def test_ranking_validation_window_sits_between_training_and_test():
    ds = generate_synthetic(num_users=12, num_items=50, mean_events=30, seed=3)
    for user in ds.users:
        v0, v1 = window(user, "valid")
        t0, t1 = window(user, "test")
        assert v1 == t0 and t1 == len(user) and v0 == validation_cut(user)
        assert v1 - v0 == max(1, math.ceil(0.1 * t0))
    train = training_requests(ds, ("ctr",), ContextLimits(), hold_out=True)
    cut = {u.user_id: validation_cut(u) for u in ds.users}
    assert sum(len(r.candidates) for r in train) == sum(c - 1 for c in cut.values())
    valid = evaluation_requests(ds, ("ctr",), ContextLimits(), "valid")
    assert len(valid) == len(ds.users)


@pytest.mark.parametrize("task", ["retrieval", "ranking"])
def test_train_model_saves_the_best_epoch_and_names_it(tmp_path, task, capsys):
    spec = "synthetic:users=40,items=60,events=25,seed=4"
    from grinfer.data import load_dataset

    ds = load_dataset(spec)
    cfg = preset("hstu-ml1m").replace(max_seq_len=16) if task == "retrieval" else preset("mtgr-tiny")
    settings = TrainSettings(epochs=4, batch_size=4, lr=3e-3, num_negatives=16, patience=2, progress=True)
    record = train_model(cfg, ds, spec, settings, tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "metrics.json").read_text())
    monitor = "valid_hr@10" if task == "retrieval" else "valid_gauc"
    values = [h[monitor] for h in saved["history"]]
    best = int(np.argmax(values)) + 1
    assert saved["best_epoch"] == saved["saved_epoch"] == best == record["best_epoch"]
    assert saved["best_validation"] == pytest.approx(max(values))
    # the checkpoint holds that epoch's weights: its validation metric is the best one again
    model = load_checkpoint(tmp_path / "m")
    if task == "retrieval":
        from grinfer.train.retrieval import evaluate_retrieval

        again = evaluate_retrieval(model, ds, "valid", ks=(10,))["hr@10"]
    else:
        from grinfer.features import Featurizer
        from grinfer.train.ranking import evaluate_ranking

        metrics = evaluate_ranking(model, ds, Featurizer(ds.catalog, model.cfg.num_time_buckets), split="valid")
        again = float(np.mean([metrics[t]["gauc"] for t in model.cfg.tasks]))
    assert again == pytest.approx(max(values), abs=1e-6)
    err = capsys.readouterr().err
    assert "s per epoch of training, so at most" in err and "epoch 1 took" in err


def test_flagless_cli_train_runs_the_presets_recipe(tmp_path):
    from typer.testing import CliRunner

    from grinfer.cli import app

    out = tmp_path / "hstu"
    result = CliRunner().invoke(app, ["train", "--task", "retrieval", "--preset", "hstu-ml1m", "--set",
                                      "max_seq_len=16", "--data", "synthetic:users=30,items=40,events=12,seed=5",
                                      "--epochs", "2", "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "up to 2 epochs (patience 40)" in result.output and "saved)" in result.output
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["settings"]["patience"] == RETRIEVAL_RECIPE["patience"] and saved["settings"]["lr"] == 1e-3
    bad = CliRunner().invoke(app, ["train", "--decay", "linear", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "--decay must be none or cosine" in bad.output
