"""`grinfer bench-embeddings` on a small memory-mapped checkpoint: the report's rows are all there."""

from __future__ import annotations

from typer.testing import CliRunner

from grinfer.cli import app
from grinfer.model.random_init import write_random_checkpoint


def test_bench_embeddings_reports_start_up_latency_and_rows_per_s(tmp_path, mtgr_cfg):
    cfg = mtgr_cfg.replace(item_table_rows=5000, num_items=20_000, profile_cardinalities=(16, 16, 16, 16))
    write_random_checkpoint(cfg, tmp_path / "m", "int4")
    out = CliRunner().invoke(app, ["bench-embeddings", "--model", str(tmp_path / "m"), "--batch", "2", "--static",
                                   "6", "--realtime", "2", "--candidates", "4", "--iters", "1", "--json",
                                   str(tmp_path / "r.json")])
    assert out.exit_code == 0, out.output
    for row in ("ready (load + engine)", "cold rows (disk)", "warm row cache", "service alone, cache", "peak RSS",
                "5,000 rows, int4", "hash collision rate, 20,000 ids"):
        assert row in out.output, row
    assert (tmp_path / "r.json").is_file()
    bad = CliRunner().invoke(app, ["bench-embeddings", "--model", str(tmp_path / "none")])
    assert bad.exit_code == 2 and "not a checkpoint directory" in bad.output
    write_random_checkpoint(mtgr_cfg, tmp_path / "small", "int8")
    bad = CliRunner().invoke(app, ["bench-embeddings", "--model", str(tmp_path / "small")])
    assert bad.exit_code == 2 and "--model: the benchmark's synthetic requests need" in bad.output
