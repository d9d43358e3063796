"""The bench report: TFLOP/s printed with the significant digits a CPU figure needs; JSON + PNG written."""

import json

from grinfer.bench.run import format_table, write_report

ROW = {"workload": "CPU-demo", "backend": "eager", "pipeline_depth": 2, "batch": 8, "step_ms": 3.1,
       "p50_ms": 3.2, "p99_ms": 4.1,
       "ms_per_request": 0.4, "requests_per_s": 2500.0, "candidates_per_s": 250000.0,
       "achieved_tflops": 0.000123, "peak_memory_gb": 0.5, "kv_hit_ratio": 0.0,
       "max_abs_diff_vs_uncached": 0.0, "max_abs_err_vs_fp32": 0.0,
       "phase_ms_per_step": {"schedule": 0.1, "featurize": 0.5, "indices": 0.2, "launch": 2.0, "wait": 0.1,
                             "result": 0.05}}


def test_small_tflops_keep_their_significant_digits():
    table = format_table([ROW], ceiling=0.0421)
    assert "0.000123" in table.splitlines()[1]
    assert "0.0421 TFLOP/s" in table
    assert "0.000 " not in table
    phases = table.splitlines()[-2:]  # the host-ms-per-step table: a header and the row
    assert "featurize" in phases[0] and "2.000" in phases[1]


def test_report_writes_json_and_png(tmp_path):
    out = tmp_path / "b.json"
    text = write_report([ROW], 0.0421, "cpu", out)
    assert "card: cpu" in text
    assert json.loads(out.read_text())["results"][0]["achieved_tflops"] == ROW["achieved_tflops"]
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
