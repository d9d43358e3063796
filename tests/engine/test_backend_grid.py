"""The cached == uncached invariant for every backend x pipeline depth x cache tier combination, on one
scenario that exercises them together: more users than the device pool holds (evictions to the tiers and
restores), then follow-ups that extend, repeat or re-version each context, in a step budget small enough
for candidate micro-batches."""

from __future__ import annotations

import numpy as np
import pytest
from aoti_util import AOTI_BLOCK_SIZE, aoti_package
from engine_util import (
    append_events,
    assert_scores,
    assert_unpinned,
    engine_request,
    kv_bytes,
    make_core,
    run,
    with_context,
)
from test_backends import compiler_problem
from triton_util import interpreted_module

BACKEND_ATOL = {"eager": 1e-5, "compiled": 1e-4, "fused": 1e-4, "aoti": 1e-5}  # kernels accumulate in another order
TIER_SETS = ["device-only", "host+disk"]


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the fused backend's kernels in Triton's interpreter


@pytest.mark.parametrize("tiers", TIER_SETS)
@pytest.mark.parametrize("depth", [1, 2], ids=["sync", "pipelined"])
@pytest.mark.parametrize("backend", list(BACKEND_ATOL))
def test_every_backend_depth_and_tier(model, catalog, featurizer, make_request, backend, depth, tiers, tmp_path,
                                      request):
    if backend == "compiled" and (problem := compiler_problem()):
        pytest.skip(problem)
    if backend == "fused":
        interpreted_module("grinfer.ops.triton.hstu_attention")
        interpreted_module("grinfer.ops.triton.layer_norm")
    config = {}
    if backend == "aoti":
        config["aoti_path"] = aoti_package(model, request)  # compiled for this grid's block size
    if tiers == "host+disk":  # the host tier holds one user, older ones go on to the disk
        config.update(host_cache_bytes=kv_bytes(model, 18), disk_cache_bytes=kv_bytes(model, 400),
                      disk_cache_dir=str(tmp_path))
    core = make_core(model, catalog, backend=backend, pipeline_depth=depth, cpu_device_thread=depth > 1,
                     block_size=AOTI_BLOCK_SIZE, max_batch_tokens=32,
                     kv_cache_bytes=kv_bytes(model, 11 * 4), **config)
    rng = np.random.default_rng(5)
    first = [engine_request(f"u{i}", make_request(12, 2, 2 + i, seed=300 + i)) for i in range(4)]
    rounds = [first, [with_context(q, append_events(q.context, rng, 1)) for q in first[:2]]
              + [with_context(first[2], first[2].context), with_context(first[3], first[3].context, version=1)]]
    for requests in rounds:
        results = run(core, requests)
        for q in requests:
            assert_scores(model, featurizer, q, results[q.request_id], atol=BACKEND_ATOL[backend])
        assert_unpinned(core)
    stats = core.stats()["kv_cache"]
    assert stats["evictions"] >= 2
    if tiers != "device-only":
        assert stats["host_hits"] + stats["disk_hits"] >= 1
    if backend == "aoti":  # every step ran in the package
        assert core.runner.backend.stats() == {"package_steps": core.steps, "eager_steps": 0}
    core.close()
