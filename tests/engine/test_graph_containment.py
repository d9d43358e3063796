"""CUDA-graph captures off the request path, and failed captures contained (issue: fused under concurrency).

The graph cache's bookkeeping (pending buckets, eager fallback, failed buckets, pool replacement) is the
real one; only the recording primitive is replaced, since there is no CUDA here: a "graph" replays the
layer stack over the bucket's static inputs (so padding and stale inputs are exercised as on a GPU), and
chosen buckets raise during capture the way a capture raced by another thread does.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from engine_util import assert_scores, engine_request, make_core, run, with_context
from triton_util import interpreted_module

from grinfer.engine import Engine
from grinfer.engine.backends.graphs import GraphCache

attention_kernels = interpreted_module("grinfer.ops.triton.hstu_attention")
norm_kernels = interpreted_module("grinfer.ops.triton.layer_norm")

ATOL = 1e-4


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


class _Replay:
    def __init__(self, run):
        self.replay = run


class FaultyGraphs(GraphCache):
    """A graph cache whose capture raises on the buckets `fail` picks (CPU stand-in for CUDA recording)."""

    def __init__(self, *args, fail, **kw):
        self.fail, self.pools, self.released, self.recorded = fail, 0, [], []
        self.busy = lambda: False  # set to "the engine has requests admitted" by the tests that check it
        self.captured_while_busy = 0
        super().__init__(*args, **kw)

    def _new_pool(self):
        self.pools += 1
        return self.pools

    def _record(self, g):
        self.captured_while_busy += self.busy()
        key = g.inputs.key()
        if self.fail(key):
            raise RuntimeError("operation not permitted when stream is capturing")
        g.out = torch.empty_like(g.x)
        g.graph = _Replay(lambda: g.out.copy_(self.layers(g.x, g.inputs)))
        self.recorded.append(key)

    def _release(self, pool):
        self.released.append(pool)


def wait_until_captured(engine, graphs, timeout_s: float = 120.0) -> None:
    """Leave the engine idle until no bucket is pending (bounded)."""
    deadline = time.monotonic() + timeout_s
    while graphs.pending and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not graphs.pending, f"buckets still pending after {timeout_s} s: {list(graphs.pending)}"
    # a call runs on the engine's thread: the capture that took the last pending bucket has finished
    engine.call(lambda: None).result(timeout=60)


def faulty_core(model, catalog, fail, **config):
    core = make_core(model, catalog, backend="fused", block_size=4, **{"capture_idle_s": 0.01, **config})
    backend = core.runner.backend
    backend.use_graphs = True
    layers = len(model.layers)
    backend.graphs = FaultyGraphs(lambda x, inputs: backend._layers(x, inputs, core.pool, 0, layers),
                                  model.cfg.d_model, torch.float32, torch.device("cpu"), fail=fail)
    return core, backend.graphs


def test_new_buckets_run_eagerly_until_captured_and_failed_captures_stay_eager(model, catalog, featurizer,
                                                                               make_request):
    failing: set[tuple] = set()
    core, graphs = faulty_core(model, catalog, fail=lambda key: key in failing)
    reqs = [engine_request(f"u{i}", make_request(s, r, c, seed=60 + i))
            for i, (s, r, c) in enumerate([(5, 2, 3), (9, 1, 6), (2, 0, 2)])]
    for q in reqs:  # one step each: three cold steps, served eagerly, their buckets queued
        assert_scores(model, featurizer, q, run(core, [q])[q.request_id], atol=ATOL)
    assert graphs.stats()["graphs"] == 0 and graphs.eager_steps == 3
    pending = list(graphs.pending)
    failing.add(pending[0])  # the first bucket's capture will fail
    while core.runner.backend.capture_pending():
        pass
    assert graphs.failures == 1 and pending[0] in graphs.failed
    assert graphs.released == [1] and graphs.pool == 2  # the failed capture's pool dropped, a fresh one in use
    assert set(graphs.graphs) == set(pending[1:]) and not graphs.pending
    # the same requests again (hits): failed bucket eager, captured ones replayed, scores unchanged
    for q in reqs:
        again = with_context(q, q.context)
        result = run(core, [again])[again.request_id]
        assert result.cache == "hit"
        assert_scores(model, featurizer, again, result, atol=ATOL)
    assert graphs.stats()["capture_failures"] == 1


def test_an_engine_whose_captures_all_fail_keeps_serving_concurrent_requests(model, catalog, featurizer,
                                                                             make_request):
    """Every capture fails while requests keep coming from many threads: all succeed, the engine stays ready."""
    core, graphs = faulty_core(model, catalog, fail=lambda key: True)
    engine = Engine(model, catalog, core.config)
    engine.core = core  # the engine over the fault-injected core
    reqs = [engine_request(f"u{i}", make_request(3 + i % 4, i % 3, 2 + i % 5, seed=80 + i)) for i in range(24)]
    results = []
    with engine:
        for wave in (reqs[:8], reqs[8:16], reqs[16:]):  # waves, the engine idle (capturing) in between
            futures = [engine.submit(q) for q in wave]
            results += [f.result(timeout=120) for f in futures]
            wait_until_captured(engine, graphs)
        assert engine.health() is None
    for q, result in zip(reqs, results):
        assert_scores(model, featurizer, q, result, atol=ATOL)
    assert graphs.failures >= 1 and not graphs.graphs
    assert engine.stats()["backend"]["capture_failures"] == graphs.failures


def test_capture_off_the_request_path_happens_when_the_engine_is_idle(model, catalog, featurizer, make_request):
    core, graphs = faulty_core(model, catalog, fail=lambda key: False, capture_busy_s=0.0)  # lulls only
    engine = Engine(model, catalog, core.config)
    engine.core = core
    graphs.busy = core.has_work  # a capture must never start while requests are admitted
    reqs = [engine_request(f"c{i}", make_request(2 + i % 5, i % 3, 1 + i % 4, seed=120 + i)) for i in range(32)]
    with engine:
        threads = [threading.Thread(target=lambda q=q: engine.rank_sync(q, timeout=60)) for q in reqs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wait_until_captured(engine, graphs)
        assert graphs.recorded and not graphs.pending and graphs.captured_while_busy == 0
        q = reqs[0]
        again = with_context(q, q.context)
        assert_scores(model, featurizer, again, engine.rank_sync(again, timeout=60), atol=ATOL)


def test_failing_steps_make_the_engine_unhealthy_and_a_success_heals_it(model, catalog, make_request):
    engine = Engine(model, catalog, make_core(model, catalog, fallback=False).config)  # failures reach callers
    real = engine.core.runner.launch
    broken = {"on": True}

    def launch(plan, *args):
        if broken["on"]:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(plan, *args)

    engine.core.runner.launch = launch
    rng = np.random.default_rng(0)
    with engine:
        for i in range(3):
            with pytest.raises(RuntimeError, match="illegal memory access"):
                engine.rank_sync(engine_request(f"x{i}", make_request(2, 1, 2, seed=int(rng.integers(1 << 20)))), 60)
        reason = engine.health()
        assert reason is not None and "3 device turns in a row failed" in reason and "illegal memory" in reason
        broken["on"] = False
        engine.rank_sync(engine_request("ok", make_request(2, 1, 2, seed=1)), 60)
        assert engine.health() is None
        assert engine.stats()["failures"] == 3


def test_warm_up_leaves_no_bucket_pending(model, catalog):
    from grinfer.serving.warmup import warm_up

    core, graphs = faulty_core(model, catalog, fail=lambda key: False)
    engine = Engine(model, catalog, core.config)
    engine.core = core
    seen = []
    with engine:
        report = warm_up(engine, seen.append, max_batch=4, candidates=(3,), num_static=5, num_realtime=2)
        assert engine.health() is None
    assert report["graphs"] == len(graphs.graphs) > 0 and not graphs.pending
    assert seen[-1] == 1.0 and seen == sorted(seen)
    assert core.cache.snapshot()["misses"] == 0  # warm-up lookups are not counted as traffic


def test_a_bucket_that_steps_keep_needing_is_captured_under_load_without_lulls(model, catalog, featurizer,
                                                                                make_request):
    """Load that never leaves a lull: the bucket that at least 3 steps needed is captured between steps (rate-
    limited by capture_busy_s), the steps after it replay it, and scores stay the eager ones."""
    core, graphs = faulty_core(model, catalog, fail=lambda key: False, capture_idle_s=30.0, capture_busy_s=0.001)
    engine = Engine(model, catalog, core.config)
    engine.core = core
    graphs.busy = lambda: True  # every capture in this test happens between steps of a busy engine
    reqs = [engine_request(f"b{i}", make_request(3, 1, 2, seed=150 + i)) for i in range(8)]  # one bucket
    with engine:
        results = [engine.rank_sync(q, timeout=60) for q in reqs]
    assert graphs.recorded and graphs.captured_while_busy == len(graphs.recorded)
    assert graphs.eager_steps < len(reqs)  # the later steps replayed the captured bucket
    for q, result in zip(reqs, results):
        assert_scores(model, featurizer, q, result, atol=ATOL)


def test_captures_wait_for_a_lull_in_traffic(model, catalog, make_request):
    """Requests a little apart (a closed-loop client) never leave the engine idle long enough to capture."""
    core, graphs = faulty_core(model, catalog, fail=lambda key: False, capture_busy_s=0.0)
    engine = Engine(model, catalog, core.config.model_copy(update={"capture_idle_s": 5.0}))
    engine.core = core
    with engine:
        for i in range(6):
            engine.rank_sync(engine_request(f"l{i}", make_request(3, 1, 2, seed=140 + i)), timeout=60)
        assert graphs.pending and not graphs.recorded  # buckets seen, none captured between the requests
