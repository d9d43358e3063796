"""The `fused` backend (Triton kernels over the paged cache) against `eager` and the uncached model.

Its kernels run in Triton's interpreter here (tests/triton_util.py), so shapes stay tiny; the same
comparison at the real shapes runs on a GPU with `grinfer bench --backends eager,compiled,fused`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from engine_util import (
    append_events,
    assert_scores,
    engine_request,
    fixed_model,
    make_core,
    run,
    truncate_realtime,
    uncached,
    with_context,
)
from triton_util import interpreted_module

from grinfer.config import ModelConfig
from grinfer.engine.backends.graphs import GraphCache, bucket, pow2

attention_kernels = interpreted_module("grinfer.ops.triton.hstu_attention")
norm_kernels = interpreted_module("grinfer.ops.triton.layer_norm")

ATOL = 1e-4  # float32 end to end; kernels accumulate in another order than PyTorch


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("block_size", [4, 16])
def test_cold_then_warm_requests_match_eager_and_uncached(model, catalog, featurizer, make_request, block_size):
    """Misses, then new real-time events over the cached context (partial hits), then exact repeats (hits)."""
    cores = {name: make_core(model, catalog, backend=name, block_size=block_size) for name in ("eager", "fused")}
    rng = np.random.default_rng(0)
    first = [engine_request(f"u{i}", make_request(s, r, c, seed=i))
             for i, (s, r, c) in enumerate([(9, 3, 5), (0, 2, 3), (5, 0, 4), (12, 4, 1)])]
    rounds = [first, [with_context(q, append_events(q.context, rng, 2)) for q in first]]
    rounds.append([with_context(q, q.context) for q in rounds[1]])
    for requests in rounds:
        results = {name: run(core, requests) for name, core in cores.items()}  # same requests, same ids
        for q in requests:
            fused, eager = results["fused"][q.request_id], results["eager"][q.request_id]
            assert fused.cache == eager.cache
            torch.testing.assert_close(fused.probabilities, eager.probabilities, atol=ATOL, rtol=0)
            assert_scores(model, featurizer, q, fused, atol=ATOL)
    assert cores["fused"].runner.backend.name == "fused"
    assert cores["fused"].cache.snapshot()["hits"] == len(first)


def test_micro_batched_candidates_and_layer_chunked_contexts(model, catalog, featurizer, make_request):
    """A step budget smaller than a request: candidates in several steps, the context a few layers per step."""
    core = make_core(model, catalog, backend="fused", block_size=4, max_batch_tokens=16)
    reqs = [engine_request("a", make_request(20, 3, 9, seed=5)), engine_request("b", make_request(2, 1, 30, seed=6))]
    results = run(core, reqs)
    for q in reqs:
        assert results[q.request_id].steps > 1
        assert_scores(model, featurizer, q, results[q.request_id], atol=ATOL)
    shorter = with_context(reqs[0], truncate_realtime(reqs[0].context, 1))  # a prefix of the cached events
    assert_scores(model, featurizer, shorter, run(core, [shorter])[shorter.request_id], atol=ATOL)


def test_plain_layer_norm_and_max_len_normaliser(mtgr_cfg: ModelConfig, catalog, featurizer, make_request):
    model = fixed_model(mtgr_cfg.replace(group_ln=False, normalizer="max_len"), seed=3)
    core = make_core(model, catalog, backend="fused", block_size=8)
    q = engine_request("a", make_request(6, 2, 4, seed=7))
    assert_scores(model, featurizer, q, run(core, [q])[q.request_id], atol=ATOL)


def test_bf16_error_against_fp32_at_most_twice_eager_bf16(model, catalog, featurizer, make_request):
    """DESIGN's accuracy bar: |fused bf16 - fp32 model| <= 2x |eager bf16 - fp32 model| (plus bf16's resolution)."""
    reqs = [engine_request(f"u{i}", make_request(8, 3, 6, seed=20 + i)) for i in range(3)]
    exact = {q.request_id: uncached(model, featurizer, q) for q in reqs}
    err = {}
    for name in ("eager", "fused"):
        core = make_core(fixed_model(model.cfg), catalog, backend=name, dtype="bfloat16", block_size=4)
        results = run(core, reqs)
        err[name] = max(float((results[q.request_id].probabilities - exact[q.request_id]).abs().max())
                        for q in reqs)
    assert err["eager"] > 0
    assert err["fused"] <= 2 * err["eager"] + 2 ** -9, err


def test_shape_buckets():
    assert [bucket(n) for n in (0, 1, 16, 17, 31, 33, 100, 1000, 52_000)] == [16, 16, 16, 18, 32, 36, 104, 1024,
                                                                                 53_248]
    assert all(n <= bucket(n) <= max(16, n * 1.125) for n in range(1, 5000))
    assert [pow2(n) for n in (0, 1, 2, 3, 64, 65)] == [1, 1, 2, 4, 64, 128]


def test_padded_static_inputs_of_the_cuda_graphs_give_the_same_scores(model, catalog, featurizer, make_request):
    """The graphs' padding, run eagerly: steps of different shapes share buckets and their static inputs (stale
    rows, slots, offsets and tables of the previous step), and scores still equal the uncached model's."""
    core = make_core(model, catalog, backend="fused", block_size=4)
    backend = core.runner.backend
    layers = len(model.layers)
    backend.use_graphs = True
    backend.graphs = GraphCache(lambda x, inputs: backend._layers(x, inputs, core.pool, 0, layers), model.cfg.d_model,
                                torch.float32, torch.device("cpu"), capture=False)
    rng = np.random.default_rng(3)
    first = [engine_request(f"u{i}", make_request(s, r, 3, seed=40 + i)) for i, (s, r) in enumerate([(3, 1), (2, 2),
                                                                                                     (4, 0)])]
    a = first[0]
    grown = with_context(a, append_events(a.context, rng, 1))
    again = with_context(grown, grown.context)  # a hit: fewer queries in the same bucket, stale slots reset
    rounds = [first, [grown], [again], [with_context(a, append_events(grown.context, rng, 1))]]
    for requests in rounds:
        results = run(core, requests)
        for q in requests:
            assert_scores(model, featurizer, q, results[q.request_id], atol=ATOL)
    assert results[rounds[-1][0].request_id].cache == "partial"
    assert len(backend.graphs.graphs) < len(rounds)  # steps of other shapes shared a bucket


def test_relative_bias_models_are_rejected(mtgr_cfg: ModelConfig, catalog):
    model = fixed_model(mtgr_cfg.replace(rel_bias=True))
    with pytest.raises(ValueError, match="relative attention bias"):
        make_core(model, catalog, backend="fused")
