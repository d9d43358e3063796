"""`grinfer bench`'s engine rows: batch by batch and streamed (every timed batch queued at once), warm and cold,
both depths; the engine's scores agree with the uncached model either way."""

from dataclasses import replace

import pytest

from grinfer.bench.run import row_line, run_workload
from grinfer.bench.workloads import workload


@pytest.mark.parametrize("new_events", [2, None], ids=["warm", "cold"])
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("depth", [1, 2])
def test_rows_batch_by_batch_and_streamed(new_events, stream, depth):
    w = workload("CPU-demo", batch=3, static=12, realtime=4, candidates=5)
    w = replace(w, new_events=new_events)
    row = run_workload(w, "eager", "cpu", iters=3, warmup=1, seed=0, engine_overrides={"pipeline_depth": depth},
                       stream=stream)
    assert row["backend"] == ("eager/stream" if stream else "eager") and row["stream"] is stream
    assert row["max_abs_diff_vs_uncached"] < 1e-5
    assert row["steps_per_batch"] == pytest.approx(1.0)  # a batch fits one step; a stream adds no steps
    assert row["requests_per_s"] > 0 and row["p99_ms"] >= row["p50_ms"] > 0
    assert (row["kv_hit_ratio"] > 0) == w.warm
    assert f"depth {depth} B=3" in row_line(row)
