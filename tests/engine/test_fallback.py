"""Per-batch fallback (engine/strategy.py) under injected faults: a backend that raises, returns NaN or
hangs on chosen steps. Every request is still answered with the uncached model's scores, the fallback
counters are exact, and the circuit breaker opens and closes as specified."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from engine_util import append_events, assert_scores, assert_unpinned, engine_request, make_core, run, with_context

from grinfer.engine.backends import EagerBackend
from grinfer.engine.strategy import BREAKER_COOLDOWN_S, BREAKER_FAILURES


class Faulty(EagerBackend):
    """The eager layers, failing on the calls (0-based) in `on` (or on every call from `always_from`)."""

    def __init__(self, model, fault: str, on=(), always_from: int | None = None, hang_s: float = 1.0):
        super().__init__(model)
        self.fault, self.on, self.always_from, self.hang_s = fault, set(on), always_from, hang_s
        self.calls = 0

    def run_layers(self, x, idx, pool, first, last):
        call, self.calls = self.calls, self.calls + 1
        if call in self.on or (self.always_from is not None and call >= self.always_from):
            if self.fault == "raise":
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            if self.fault == "hang":
                time.sleep(self.hang_s)
            if self.fault == "nan":
                return super().run_layers(x, idx, pool, first, last) * torch.nan
        return super().run_layers(x, idx, pool, first, last)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def faulty_core(model, catalog, backend: Faulty, **config):
    """A core whose chain is compiled -> eager -> baseline, its 'compiled' replaced by the faulty one."""
    core = make_core(model, catalog, backend="compiled", **{"max_batch_tokens": 64, **config})
    core.runner.backends[0] = core.runner.backend = backend
    core.chain.clock = Clock()
    return core


def requests(make_request, n: int, seed: int, prefix: str = "u"):
    return [engine_request(f"{prefix}{i}", make_request(6 + i, 2, 5 + i, seed=seed + i)) for i in range(n)]


def fallbacks(core) -> dict:
    return {(f["from"], f["to"], f["reason"]): f["count"] for f in core.stats()["strategy"]["fallbacks"]}


@pytest.mark.parametrize("depth", [1, 2], ids=["sync", "pipelined"])
@pytest.mark.parametrize("fault", ["raise", "nan"])
def test_failed_steps_are_rerun_on_the_next_backend(model, catalog, featurizer, make_request, fault, depth):
    faulty = Faulty(model, fault, on={1, 3})
    core = faulty_core(model, catalog, faulty, pipeline_depth=depth, cpu_device_thread=depth > 1)
    reqs = requests(make_request, 8, seed=10)
    results = {}
    for req in reqs:  # one request a step: the faulty backend sees calls 0..7 in order
        results.update(run(core, [req]))
    for req in reqs:
        assert_scores(model, featurizer, req, results[req.request_id])
    reason = "exception" if fault == "raise" else "non_finite"
    assert fallbacks(core) == {("compiled", "eager", reason): 2}
    assert core.stats()["strategy"]["backends"][0] == {"backend": "compiled", "healthy": True, "opened": 0}
    assert_unpinned(core)
    warm = [with_context(r, r.context) for r in reqs]  # K/V written by the re-runs serve the next requests
    again = run(core, warm)
    assert {res.cache for res in again.values()} == {"hit"}
    for req in warm:
        assert_scores(model, featurizer, req, again[req.request_id])


def test_a_pipelined_failure_reruns_the_steps_in_flight_after_it(model, catalog, featurizer, make_request):
    """Step N fails while N+1 (same request: its next candidate micro-batch over N's context) is in flight:
    both are run again, in order, and the scores are right."""
    faulty = Faulty(model, "nan", on={0})
    core = faulty_core(model, catalog, faulty, pipeline_depth=2, cpu_device_thread=True, max_batch_tokens=16)
    req = engine_request("big", make_request(6, 2, 40, seed=3))  # 12 context tokens + 40 candidates
    res = run(core, [req])[req.request_id]
    assert res.steps >= 3
    assert_scores(model, featurizer, req, res)
    assert fallbacks(core) == {("compiled", "eager", "non_finite"): 1}


def test_a_hung_step_times_out_and_is_rerun(model, catalog, featurizer, make_request):
    faulty = Faulty(model, "hang", on={1}, hang_s=1.5)
    core = faulty_core(model, catalog, faulty, pipeline_depth=2, cpu_device_thread=True, step_timeout_s=0.3)
    reqs = requests(make_request, 3, seed=20)
    results = {}
    for req in reqs:
        results.update(run(core, [req]))
    for req in reqs:
        assert_scores(model, featurizer, req, results[req.request_id])
    assert fallbacks(core) == {("compiled", "eager", "timeout"): 1}
    time.sleep(1.5)  # let the hung thread finish before the test ends


def test_the_breaker_opens_after_repeated_failures_and_closes_after_a_good_trial(model, catalog, featurizer,
                                                                                 make_request):
    faulty = Faulty(model, "raise", always_from=0)
    core = faulty_core(model, catalog, faulty, pipeline_depth=1)
    clock = core.chain.clock
    reqs = requests(make_request, BREAKER_FAILURES + 3, seed=30)
    for req in reqs:
        res = run(core, [req])[req.request_id]
        assert_scores(model, featurizer, req, res)
    # three failures open the breaker; later steps skip the faulty backend without failing on it
    assert faulty.calls == BREAKER_FAILURES
    assert fallbacks(core) == {("compiled", "eager", "exception"): BREAKER_FAILURES}
    assert core.stats()["strategy"]["active"] == "eager"
    assert core.stats()["strategy"]["backends"][0]["healthy"] is False
    clock.now += BREAKER_COOLDOWN_S  # half-open: one trial, which fails: open again
    req = engine_request("trial1", make_request(3, 1, 4, seed=40))
    assert_scores(model, featurizer, req, run(core, [req])[req.request_id])
    assert faulty.calls == BREAKER_FAILURES + 1 and core.stats()["strategy"]["active"] == "eager"
    faulty.always_from = None  # repaired
    clock.now += BREAKER_COOLDOWN_S
    req = engine_request("trial2", make_request(3, 1, 4, seed=41))
    assert_scores(model, featurizer, req, run(core, [req])[req.request_id])
    strategy = core.stats()["strategy"]
    assert strategy["active"] == "compiled" and strategy["backends"][0] == {"backend": "compiled", "healthy": True,
                                                                          "opened": 2}
    assert fallbacks(core) == {("compiled", "eager", "exception"): BREAKER_FAILURES + 1}


def test_when_every_cached_backend_fails_the_baseline_answers(model, catalog, featurizer, make_request):
    faulty = Faulty(model, "raise", always_from=0)
    core = faulty_core(model, catalog, faulty, pipeline_depth=2, max_batch_tokens=16)
    core.runner.backends[1] = Faulty(model, "raise", always_from=0)  # eager fails too
    rng = np.random.default_rng(0)
    reqs = requests(make_request, 3, seed=50)
    results = run(core, reqs)
    for req in reqs:
        assert_scores(model, featurizer, req, results[req.request_id])
    counts = fallbacks(core)
    assert counts[("compiled", "eager", "exception")] >= 1 and counts[("eager", "baseline", "exception")] >= 1
    assert core.stats()["kv_cache"]["users"] == 0  # entries the baseline served were dropped, never trusted
    assert_unpinned(core)
    follow = [with_context(r, append_events(r.context, rng, 1)) for r in reqs]
    again = run(core, follow)
    for req in follow:
        assert again[req.request_id].cache == "miss"
        assert_scores(model, featurizer, req, again[req.request_id])
