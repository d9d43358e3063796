"""The quality benchmark (grinfer.bench.quant_quality): its engine-scored ranking metrics are `grinfer eval`'s
in full precision, low precision moves them, and the users-per-GB table follows the pool's byte count."""

from __future__ import annotations

import pytest
import torch
from model_util import seeded_model

from grinfer.bench.quant_quality import engine_ranking, format_report, users_per_gb
from grinfer.config import preset
from grinfer.data import load_dataset
from grinfer.features import Featurizer
from grinfer.train.ranking import evaluate_ranking
from grinfer.train.run import config_for


@pytest.fixture(scope="module")
def dataset():
    return load_dataset("synthetic:users=40,items=60,events=40,seed=1")  # users with both labels: GAUC defined


def test_engine_ranking_in_full_precision_is_grinfer_evals(dataset):
    model = seeded_model(config_for(preset("mtgr-tiny"), dataset))
    want = evaluate_ranking(model, dataset, Featurizer(dataset.catalog, model.cfg.num_time_buckets))
    got = engine_ranking(model, dataset, "none", "model", None)
    for task in model.cfg.tasks:
        assert got[task] == pytest.approx(want[task], abs=1e-6)
    low = engine_ranking(model, dataset, "int8", "int8", None)
    assert not any(isinstance(m, torch.nn.Linear) and type(m.weight.data) is not torch.Tensor
                   for m in model.modules())  # scored on a copy: the model itself is untouched
    assert low != got and all(abs(low[t]["gauc"] - got[t]["gauc"]) < 0.05 for t in model.cfg.tasks)
    report = format_report({"settings": [{"setting": "full", "ranking": got}, {"setting": "low", "ranking": low}],
                            "users_per_gb": users_per_gb()})
    assert "ΔGAUC" in report and "+0.0000" in report


def test_8_bit_kv_holds_about_twice_the_users_per_gb_of_bf16():
    rows = {(r["workload"], r["dtype"], r["kv_dtype"]): r["users_per_gb"] for r in users_per_gb()}
    for workload in ("R2 (mtgr-small)", "R1 (mtgr-large)"):
        bf16 = rows[(workload, "bfloat16", "model")]
        assert 1.9 * bf16 < rows[(workload, "bfloat16", "int8")] == rows[(workload, "bfloat16", "fp8")] <= 2 * bf16 + 1
        assert rows[(workload, "float32", "int8")] > 3.5 * rows[(workload, "float32", "model")]
