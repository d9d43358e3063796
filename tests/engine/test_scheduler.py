"""Scheduler contracts: admission (overload, too-large contexts, max_realtime), deadlines, one step per
user at a time, per-step limits, and requests without candidates."""

from __future__ import annotations

import time

import numpy as np
import pytest
from engine_util import (
    append_events,
    assert_scores,
    assert_unpinned,
    context_tokens,
    engine_request,
    kv_bytes,
    make_core,
    record_plans,
    run,
    run_one,
    run_until_done,
    with_context,
)

from grinfer.engine import ContextTooLarge, DeadlineExceeded, Overloaded, RankResult


def users(make_request, shapes, seed=0, **kw):
    return [engine_request(f"u{i}", make_request(*shape, seed=seed + i), **kw) for i, shape in enumerate(shapes)]


# ---- admission ---------------------------------------------------------------------------------------
def test_full_queue_rejects_at_once_and_admitted_requests_complete(model, catalog, featurizer, make_request):
    core = make_core(model, catalog, max_queue=3)
    admitted = users(make_request, [(4, 2, 3), (0, 0, 2), (7, 1, 5)])
    for req in admitted:
        core.add(req)
    extra = engine_request("x", make_request(2, 1, 2, seed=9))
    with pytest.raises(Overloaded, match="queue"):
        core.add(extra)
    assert core.stats()["waiting"] == 3  # the rejected request left no trace
    results = run(core)
    assert set(results) == {r.request_id for r in admitted}
    for req in admitted:
        assert_scores(model, featurizer, req, results[req.request_id])
    # once the queue drains, the same request is admitted
    assert_scores(model, featurizer, extra, run_one(core, extra))


@pytest.mark.parametrize("block_size", [3, 4])
def test_context_that_can_never_fit_is_rejected(model, catalog, featurizer, make_request, block_size):
    capacity = 6 * block_size  # a pool of exactly 6 blocks
    core = make_core(model, catalog, block_size=block_size, kv_cache_bytes=kv_bytes(model, capacity),
                     max_batch_tokens=16)
    assert core.cache.num_blocks == 6
    too_large = engine_request("big", make_request(capacity - 4 + 1 - 2, 2, 3, seed=1))  # capacity + 1 tokens
    assert context_tokens(too_large) == capacity + 1
    with pytest.raises(ContextTooLarge, match=str(capacity + 1)):
        core.add(too_large)
    assert not core.has_work()
    largest = engine_request("max", make_request(capacity - 4 - 2, 2, 3, seed=2))  # exactly the pool
    assert context_tokens(largest) == capacity
    res = run_one(core, largest)
    assert_scores(model, featurizer, largest, res)
    # growing past the pool later is rejected too; the cached entry stays usable
    with pytest.raises(ContextTooLarge):
        core.add(with_context(largest, append_events(largest.context, np.random.default_rng(0), 1)))
    again = with_context(largest, largest.context)
    res = run_one(core, again)
    assert res.cache == "hit"
    assert_scores(model, featurizer, again, res)
    assert_unpinned(core)


@pytest.mark.parametrize("limit", [0, 3])
def test_too_many_realtime_events_is_a_value_error(model, catalog, featurizer, make_request, limit):
    core = make_core(model, catalog, max_realtime=limit)
    with pytest.raises(ValueError, match="max_realtime"):
        core.add(engine_request("u", make_request(5, limit + 1, 2)))
    assert not core.has_work()
    ok = engine_request("u", make_request(5, limit, 2))
    assert_scores(model, featurizer, ok, run_one(core, ok))


# ---- deadlines ---------------------------------------------------------------------------------------
def failures(outcomes):
    return {s.request.request_id: r for s, r in outcomes if not isinstance(r, RankResult)}


def test_request_past_its_deadline_fails_and_pins_nothing(model, catalog, featurizer, make_request):
    core = make_core(model, catalog)
    late = engine_request("late", make_request(5, 2, 3, seed=1), deadline=time.monotonic() - 1.0)
    timely = engine_request("ok", make_request(4, 1, 2, seed=2), deadline=time.monotonic() + 600.0)
    for req in (late, timely):
        core.add(req)
    outcomes = run_until_done(core)
    errors = failures(outcomes)
    assert set(errors) == {late.request_id}
    assert isinstance(errors[late.request_id], DeadlineExceeded)
    result = next(r for s, r in outcomes if s.request is timely)
    assert_scores(model, featurizer, timely, result)
    assert "late" not in core.cache.manager.entries or core.cache.manager.entries["late"].pins == 0
    assert_unpinned(core)


@pytest.mark.parametrize("phase", ["context-chunk", "candidate-micro-batch"])
def test_deadline_passing_mid_request_releases_its_entry(model, catalog, featurizer, make_request, phase):
    core = make_core(model, catalog, block_size=4, max_batch_tokens=16)
    if phase == "context-chunk":  # 39 context tokens: layer-chunked over several steps
        req = engine_request("u", make_request(30, 5, 4, seed=3), deadline=time.monotonic() + 600.0)
    else:  # warm context, 40 candidates in micro-batches of 16
        warm = engine_request("u", make_request(6, 2, 2, seed=4))
        run_one(core, warm)
        req = with_context(warm, warm.context, candidates=np.arange(1, 41), deadline=time.monotonic() + 600.0)
    other = engine_request("v", make_request(2, 0, 1, seed=5))
    core.add(req)
    core.add(other)
    outcomes = core.step()
    assert not any(s.request is req for s, _ in outcomes)  # still in flight
    assert core.cache.manager.entries["u"].pins == 1
    req.deadline = time.monotonic() - 1.0
    outcomes += run_until_done(core)
    errors = failures(outcomes)
    assert set(errors) == {req.request_id} and isinstance(errors[req.request_id], DeadlineExceeded)
    assert_unpinned(core)
    # the user is served correctly afterwards, whatever was left of its entry
    after = with_context(req, req.context, deadline=None)
    assert_scores(model, featurizer, after, run_one(core, after))


def test_a_request_whose_deadline_passes_during_its_last_step_fails_and_keeps_its_kv(model, catalog, featurizer,
                                                                                      make_request):
    """One step computes the whole request, but the deadline passes while it runs: the answer is late,
    so it is a DeadlineExceeded; the K/V it committed are whole and serve the next request."""
    core = make_core(model, catalog)
    req = engine_request("slow", make_request(6, 2, 3, seed=30), deadline=time.monotonic() + 600.0)
    launch = core.runner.launch

    def slow_step(plan, *args):
        output = launch(plan, *args)
        output.wait()
        req.deadline = time.monotonic() - 0.01  # the step took longer than the request had left
        return output

    core.runner.launch = slow_step
    core.add(req)
    (state, error), = run_until_done(core)
    assert isinstance(error, DeadlineExceeded) and state.steps == 1
    assert "missed its deadline by" in str(error)
    assert_unpinned(core)
    core.runner.launch = launch
    again = with_context(req, req.context, deadline=None)
    res = run_one(core, again)
    assert res.cache == "hit"
    assert_scores(model, featurizer, again, res)


# ---- one request per user in flight; per-step limits -------------------------------------------------
def test_requests_of_one_user_never_share_a_step(model, catalog, featurizer, make_request):
    rng = np.random.default_rng(6)
    core = make_core(model, catalog)
    plans = record_plans(core)
    a1 = engine_request("a", make_request(6, 2, 4, seed=6))
    a2 = with_context(a1, append_events(a1.context, rng, 2))
    a3 = with_context(a2, append_events(a2.context, rng, 1))
    others = users(make_request, [(3, 1, 2), (5, 0, 3)], seed=7)
    reqs = [a1, others[0], a2, others[1], a3]
    results = run(core, reqs)
    for plan in plans:
        names = [it.state.request.user for it in plan.items]
        assert len(names) == len(set(names)), names
    steps_of = {r.request_id: [i for i, p in enumerate(plans) if any(it.state.request is r for it in p.items)]
                for r in (a1, a2, a3)}
    assert max(steps_of[a1.request_id]) < min(steps_of[a2.request_id])
    assert max(steps_of[a2.request_id]) < min(steps_of[a3.request_id])
    assert [results[r.request_id].cache for r in (a1, a2, a3)] == ["miss", "partial", "partial"]
    assert results[a2.request_id].cached_tokens == context_tokens(a1)
    assert results[a3.request_id].cached_tokens == context_tokens(a2)
    for req in reqs:
        assert_scores(model, featurizer, req, results[req.request_id])


@pytest.mark.parametrize(("max_batch_tokens", "max_batch_requests"), [(32, 3), (16, 1), (64, 2), (4096, 4)])
def test_each_step_respects_the_token_and_request_limits(model, catalog, featurizer, make_request,
                                                         max_batch_tokens, max_batch_requests):
    core = make_core(model, catalog, block_size=4, max_batch_tokens=max_batch_tokens,
                     max_batch_requests=max_batch_requests)
    layers = (0, model.cfg.num_layers)
    plans = record_plans(core)
    reqs = users(make_request, [(3, 1, 2), (0, 0, 1), (12, 3, 20), (30, 6, 5), (1, 0, 9), (8, 2, 3),
                                (20, 0, 1), (0, 5, 30)], seed=10)
    results = run(core, reqs)
    computing = [p for p in plans if any(it.tokens for it in p.items)]
    assert computing
    for plan in computing:
        if plan.layers == layers:
            assert len(plan.items) <= max_batch_requests
            assert sum(it.tokens for it in plan.items) <= max_batch_tokens
        else:  # a layer chunk: one request's context alone
            assert len(plan.items) == 1 and plan.items[0].ctx_end - plan.items[0].ctx_start > max_batch_tokens
            assert plan.items[0].cand_end == plan.items[0].cand_start
    # steps do batch requests (up to the request limit when tokens are plentiful)
    widest = max(len(p.items) for p in computing)
    assert widest == max_batch_requests if max_batch_tokens >= 4096 else widest >= min(2, max_batch_requests)
    last = core.last_step
    assert last["requests"] <= max_batch_requests
    assert last["tokens"] <= max_batch_tokens or last["layers"] != layers
    for req in reqs:
        assert_scores(model, featurizer, req, results[req.request_id])
    assert_unpinned(core)


def test_schedule_plan_inspected_directly(model, catalog, make_request):
    """A first plan taken straight from the scheduler: arrival order, budget split, M-FALCON remainder."""
    core = make_core(model, catalog, max_batch_tokens=32, max_batch_requests=8)
    a = engine_request("a", make_request(6, 2, 10, seed=20))  # 12 context tokens + 10 candidates = 22
    b = engine_request("b", make_request(2, 0, 20, seed=21))  # 6 context tokens + 20 candidates
    c = engine_request("c", make_request(1, 0, 1, seed=22))
    for req in (a, b, c):
        core.add(req)
    plan = core.scheduler.schedule()
    assert plan.layers == (0, model.cfg.num_layers) and not plan.failed
    spans = [(it.state.request.user, it.ctx_start, it.ctx_end, it.cand_start, it.cand_end) for it in plan.items]
    assert spans == [("a", 0, 12, 0, 10), ("b", 0, 6, 0, 4)]  # b's candidates fill the 10 tokens left
    assert [s.request.user for s in core.scheduler.waiting] == ["c"]


# ---- requests without candidates --------------------------------------------------------------------
@pytest.mark.parametrize("max_batch_tokens", [16, 4096])
def test_zero_candidates_finishes_and_warms_the_cache(model, catalog, featurizer, make_request, max_batch_tokens):
    rng = np.random.default_rng(11)
    core = make_core(model, catalog, block_size=4, max_batch_tokens=max_batch_tokens)
    warm_up = engine_request("u", make_request(25, 3, 0, seed=11))  # 32 context tokens, no candidates
    res = run_one(core, warm_up)
    assert res.probabilities.shape == (0, len(model.cfg.tasks))
    assert (res.cache, res.computed_tokens) == ("miss", context_tokens(warm_up))
    scored = with_context(warm_up, warm_up.context, candidates=np.arange(3, 11))
    res = run_one(core, scored)
    assert (res.cache, res.cached_tokens, res.computed_tokens) == ("hit", context_tokens(warm_up), 0)
    assert_scores(model, featurizer, scored, res)
    newer = with_context(scored, append_events(scored.context, rng, 2))
    res = run_one(core, newer)
    assert (res.cache, res.computed_tokens) == ("partial", 2)
    assert_scores(model, featurizer, newer, res)
    empty_hit = with_context(newer, newer.context, candidates=np.zeros(0, np.int64))
    res = run_one(core, empty_hit)
    assert res.cache == "hit" and res.probabilities.shape == (0, len(model.cfg.tasks))
    assert_unpinned(core)


def test_a_failing_batch_fails_its_requests_and_the_engine_goes_on(model, catalog, featurizer, make_request):
    core = make_core(model, catalog)
    good = engine_request("u", make_request(4, 1, 3, seed=12))
    bad = with_context(good, good.context, candidates=np.array([1, 10_000]))  # unknown item id
    core.add(bad)
    outcomes = run_until_done(core)
    assert len(outcomes) == 1 and not isinstance(outcomes[0][1], RankResult)
    assert_unpinned(core)
    res = run_one(core, good)
    assert_scores(model, featurizer, good, res)
    assert core.stats()["waiting"] == core.stats()["running"] == 0


def test_an_expired_request_keeps_its_users_valid_cache_entry(model, catalog, featurizer, make_request):
    """A deadline miss must not throw away K/V that other requests of the user can still use."""
    from grinfer.engine import RankRequest as EngineRequest

    core = make_core(model, catalog)
    req = make_request(12, 3, 4, seed=321)
    first = EngineRequest("keep", 0, req.context, req.candidates, req.request_ts)
    core.add(first)
    core.run_until_done()
    late = EngineRequest("keep", 0, req.context, req.candidates, req.request_ts, deadline=time.monotonic() - 1)
    core.add(late)
    (_state, result), = core.run_until_done()
    assert isinstance(result, DeadlineExceeded)
    again = EngineRequest("keep", 0, req.context, req.candidates, req.request_ts)
    core.add(again)
    (_, res), = core.run_until_done()
    assert res.cache == "hit"
