"""Quantised checkpoints: `grinfer quantize` and `init-model` write them, load_checkpoint serves their tables
memory-mapped, the cached engine equals the uncached model on them, and full precision stays exact."""

from __future__ import annotations

import json
from typing import cast

import numpy as np
import pytest
import torch
from model_util import seeded_model
from typer.testing import CliRunner

from grinfer.cli import app
from grinfer.config import EngineConfig, preset
from grinfer.embedding.service import embedding_stats
from grinfer.embedding.table import ServedTable
from grinfer.engine import EngineCore, RankRequest, RankResult
from grinfer.features import retrieval_batch
from grinfer.model import build_model
from grinfer.model.checkpoint import (
    CONFIG_FILE,
    CheckpointError,
    load_checkpoint,
    read_checkpoint_meta,
    save_checkpoint,
)
from grinfer.model.hstu import HSTURetrieval
from grinfer.model.mtgr import MTGR
from grinfer.model.quantize import QuantizeOptions, quantize_checkpoint
from grinfer.model.random_init import parameter_count, write_random_checkpoint
from grinfer.model.tables import table_shapes


@pytest.fixture
def full_checkpoint(tmp_path, mtgr_cfg):
    return save_checkpoint(seeded_model(mtgr_cfg), tmp_path / "full")


def scores(model, featurizer, make_request) -> torch.Tensor:
    batch = featurizer.rank_batch([make_request(5, 2, 4, seed=1), make_request(0, 3, 2, seed=2),
                                   make_request(9, 0, 6, seed=3)])
    with torch.no_grad():
        return torch.sigmoid(model(batch))


def test_fp32_row_storage_scores_exactly_as_the_full_model(tmp_path, full_checkpoint, featurizer, make_request):
    quantize_checkpoint(full_checkpoint, tmp_path / "fp32", QuantizeOptions(embeddings="fp32"))
    served = load_checkpoint(tmp_path / "fp32")
    assert isinstance(served, MTGR) and isinstance(served.item_emb, ServedTable)
    assert all(isinstance(t, ServedTable) for t in served.profile_emb)
    assert torch.equal(scores(served, featurizer, make_request), scores(load_checkpoint(full_checkpoint), featurizer,
                                                                          make_request))


def test_a_hashed_item_table_serves_the_rows_it_was_trained_with(tmp_path, mtgr_cfg, featurizer, make_request):
    full = seeded_model(mtgr_cfg.replace(item_table_rows=97))  # fewer rows than items: some share a row
    quantize_checkpoint(save_checkpoint(full, tmp_path / "h"), tmp_path / "hq", QuantizeOptions(embeddings="fp32"))
    served = load_checkpoint(tmp_path / "hq")
    assert isinstance(served, MTGR) and isinstance(served.item_emb, ServedTable)
    assert torch.equal(scores(served, featurizer, make_request), scores(full, featurizer, make_request))


@pytest.mark.parametrize("fmt, tol", [("int8", 2e-3), ("int4", 5e-2), ("bf16", 5e-3)])
def test_quantised_tables_score_close_to_full_precision(tmp_path, full_checkpoint, featurizer, make_request, fmt, tol):
    quantize_checkpoint(full_checkpoint, tmp_path / fmt, QuantizeOptions(embeddings=fmt))
    meta = json.loads((tmp_path / fmt / CONFIG_FILE).read_text())
    assert set(meta["embeddings"]) == set(table_shapes(load_checkpoint(full_checkpoint).cfg))
    want = scores(load_checkpoint(full_checkpoint), featurizer, make_request)
    got = scores(load_checkpoint(tmp_path / fmt), featurizer, make_request)
    diff = float((got - want).abs().max())
    assert 0 < diff < tol


def test_a_served_model_saves_and_reloads_as_stored(tmp_path, full_checkpoint, featurizer, make_request):
    quantize_checkpoint(full_checkpoint, tmp_path / "q", QuantizeOptions(embeddings="int8"))
    served = load_checkpoint(tmp_path / "q")
    again = load_checkpoint(save_checkpoint(served, tmp_path / "again"))
    assert json.loads((tmp_path / "again" / CONFIG_FILE).read_text())["embeddings"]["item_emb"] == "int8"
    assert torch.equal(scores(again, featurizer, make_request), scores(served, featurizer, make_request))


def test_quantised_retrieval_model_scores_every_item(tmp_path):
    cfg = preset("hstu-ml1m").with_vocab(num_items=50)
    torch.manual_seed(0)
    full = build_model(cfg).eval()
    quantize_checkpoint(save_checkpoint(full, tmp_path / "h"), tmp_path / "hq", QuantizeOptions(embeddings="int8"))
    served = load_checkpoint(tmp_path / "hq")
    assert isinstance(full, HSTURetrieval) and isinstance(served, HSTURetrieval)
    batch = retrieval_batch([(np.array([3, 7, 9]), np.array([10, 20, 30])), (np.array([1]), np.array([5]))],
                            with_targets=False)
    with torch.no_grad():
        want = full.user_embedding(batch) @ full.item_table().T
        got = served.user_embedding(batch) @ served.item_table().T
    assert got.shape == want.shape and float((got - want).abs().max()) < 0.05


def test_the_engine_on_a_quantised_hashed_checkpoint_equals_the_uncached_model(tmp_path, mtgr_cfg, catalog,
                                                                               featurizer, make_request):
    cfg = mtgr_cfg.replace(item_table_rows=3000)
    write_random_checkpoint(cfg, tmp_path / "r", "int8", chunk_rows=700)  # chunks that do not divide the rows
    model = load_checkpoint(tmp_path / "r", row_cache_bytes=4096)  # a cache far smaller than the table
    assert isinstance(model, MTGR) and model.item_emb.num_embeddings == 3000
    core = EngineCore(model, catalog, EngineConfig(kv_cache_bytes=1 << 22))
    reqs = [make_request(6, 3, 5, seed=s) for s in range(4)]
    for i, r in enumerate(reqs):
        core.add(RankRequest(f"u{i}", 0, r.context, r.candidates, r.request_ts))
    results = [res for _, res in core.run_until_done()]
    assert all(isinstance(res, RankResult) for res in results)
    for r, res in zip(reqs, sorted(results, key=lambda res: cast(RankResult, res).request_id)):
        assert isinstance(res, RankResult)
        with torch.no_grad():
            want = torch.sigmoid(model(featurizer.rank_batch([r])))
        assert torch.allclose(torch.as_tensor(res.probabilities), want, atol=1e-5)
    stats = embedding_stats(core.model)["item_emb"]
    assert stats["lookups"] > 0 and 0.0 < stats["hit_ratio"] <= 1.0 and stats["format"] == "int8"
    core.close()


def test_mtgr_8b_has_8e9_parameters_mostly_in_its_item_table():
    cfg = preset("mtgr-8b")
    assert parameter_count(cfg) >= 8e9
    assert table_shapes(cfg)["item_emb"].hashed and table_shapes(cfg)["item_emb"].rows == 125_000_000


def test_load_errors_name_the_table_and_tensor(tmp_path, full_checkpoint):
    quantize_checkpoint(full_checkpoint, tmp_path / "q", QuantizeOptions(embeddings="int8"))
    meta_file = tmp_path / "q" / CONFIG_FILE
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "embeddings": {**meta["embeddings"], "user_emb": "int8"}}))
    with pytest.raises(CheckpointError, match="embeddings: 'user_emb' is not one of the model's tables"):
        load_checkpoint(tmp_path / "q")
    meta_file.write_text(json.dumps({**meta, "embeddings": {**meta["embeddings"], "item_emb": "int4"}}))
    with pytest.raises(CheckpointError, match=r"table 'item_emb' has \d+ x 32 rows .* implies \d+ x 16"):
        load_checkpoint(tmp_path / "q")  # int8 codes read as int4 ones: twice as wide
    meta_file.write_text(json.dumps({**meta, "embeddings": {**meta["embeddings"], "item_emb": "fp16"}}))
    with pytest.raises(CheckpointError, match=r"tensor 'item_emb\.weight': a fp16 table 'item_emb' needs it"):
        load_checkpoint(tmp_path / "q")
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="already stored as int8"):
        quantize_checkpoint(tmp_path / "q", tmp_path / "qq", QuantizeOptions(embeddings="int8"))


def test_cli_quantize_and_init_model(tmp_path, full_checkpoint):
    runner = CliRunner()
    ok = runner.invoke(app, ["quantize", "--model", str(full_checkpoint), "--out", str(tmp_path / "q"),
                             "--embeddings", "int8"])
    assert ok.exit_code == 0 and "as int8" in ok.output
    for args, message in [(["quantize", "--model", str(full_checkpoint), "--out", str(tmp_path / "x")],
                           "--embeddings: nothing to convert"),
                          (["quantize", "--model", str(full_checkpoint), "--out", str(full_checkpoint),
                            "--embeddings", "int8"], "--out: must differ"),
                          (["init-model", "--preset", "mtgr-tiny", "--out", str(tmp_path / "i"), "--embeddings",
                            "int3"], "--embeddings: unknown row format 'int3'")]:
        bad = runner.invoke(app, args)
        assert bad.exit_code == 2 and message in bad.output, bad.output
    made = runner.invoke(app, ["init-model", "--preset", "mtgr-tiny", "--out", str(tmp_path / "i"),
                               "--set", "item_table_rows=999", "--data", "synthetic:users=5,items=50,seed=1"])
    assert made.exit_code == 0, made.output
    assert load_checkpoint(tmp_path / "i").item_emb.num_embeddings == 999
    # the recorded dataset is what `grinfer serve --model` fills its store from
    assert read_checkpoint_meta(tmp_path / "i")["training"] == {"data": "synthetic:users=5,items=50,seed=1"}


def test_metrics_export_each_served_tables_lookups_and_hit_ratio(tmp_path, mtgr_cfg, catalog, make_request):
    from grinfer.engine import Engine
    from grinfer.serving.metrics import EngineCollector

    write_random_checkpoint(mtgr_cfg.replace(item_table_rows=500), tmp_path / "r", "int8")
    model = load_checkpoint(tmp_path / "r")
    assert isinstance(model, MTGR)
    engine = Engine(model, catalog, EngineConfig(kv_cache_bytes=1 << 22))
    r = make_request(6, 3, 5, seed=0)
    for user in ("a", "b"):  # the same items twice: the second request's rows are cache hits
        engine.core.add(RankRequest(user, 0, r.context, r.candidates, r.request_ts))
        engine.core.run_until_done()
    families = {f.name: f for f in EngineCollector(engine).collect()}
    ratio = {s.labels["table"]: s.value for s in families["grinfer_embedding_cache_hit_ratio"].samples}
    assert set(ratio) == set(table_shapes(mtgr_cfg)) and 0.0 < ratio["item_emb"] < 1.0
    lookups = {s.labels["table"]: s.value for s in families["grinfer_embedding_lookups"].samples
               if s.name.endswith("_total")}
    assert lookups["item_emb"] == 2 * (len(r.context.items) + len(r.candidates))
    engine.core.close()


def test_exporters_refuse_served_tables_by_name(tmp_path, full_checkpoint):
    from grinfer.export.support import UnsupportedFeature, check_exportable

    quantize_checkpoint(full_checkpoint, tmp_path / "q", QuantizeOptions(embeddings="int8"))
    with pytest.raises(UnsupportedFeature, match=r"module item_emb \(grinfer\.embedding\.table\.ServedTable\)"):
        check_exportable(load_checkpoint(tmp_path / "q"))
