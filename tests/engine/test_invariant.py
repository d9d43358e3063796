"""The engine's core invariant (DESIGN §6): cached and uncached scores agree (float32, atol 1e-5).

Every engine result below is compared, candidate by candidate, with the full model run on the same
request with nothing cached, across cold, warm, repeated, shortened, diverging and re-versioned
contexts, eviction and refill (device only, host tier, disk tier, host then disk), layer-chunked
contexts, candidate micro-batches and ragged mixed batches — each with the synchronous engine
(pipeline_depth 1) and the pipelined one (2).
"""

from __future__ import annotations

import itertools

import engine_util
import numpy as np
import pytest
from engine_util import (
    append_events,
    assert_scores,
    assert_unpinned,
    context_tokens,
    engine_request,
    fixed_model,
    fold_realtime,
    kv_bytes,
    make_core,
    record_plans,
    run,
    run_one,
    truncate_realtime,
    with_context,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grinfer.features import UserContext

BLOCK_SIZES = [1, 3, 32]  # 3 and 32 leave partial blocks for most lengths below; 1 never does


@pytest.fixture(autouse=True, params=[1, 2], ids=["sync", "pipelined"])
def pipeline_depth(request, monkeypatch):
    """Every test of this module runs with the synchronous engine and the pipelined one."""
    monkeypatch.setitem(engine_util.CORE_DEFAULTS, "pipeline_depth", request.param)
    monkeypatch.setitem(engine_util.CORE_DEFAULTS, "cpu_device_thread", request.param > 1)  # the threaded path
    return request.param


def cold_users(make_request, shapes, seed=0, prefix="u"):
    """One engine request per (num_static, num_realtime, num_candidates), users u0, u1, ..."""
    return [engine_request(f"{prefix}{i}", make_request(*shape, seed=seed + i)) for i, shape in enumerate(shapes)]


def replace_realtime(context: UserContext, index: int, *, item=None, ts_shift=0, rating=None) -> UserContext:
    """The context with real-time event `index` changed (its item, its rating, or it and later timestamps)."""
    items, stamps, ratings = context.items.copy(), context.timestamps.copy(), context.ratings.copy()
    j = context.num_static + index
    if item is not None:
        assert items[j] != item
        items[j] = item
    if ts_shift:
        stamps[j:] += ts_shift
    if rating is not None:
        assert ratings[j] != rating
        ratings[j] = rating
    return UserContext(context.profile, items, stamps, ratings, context.num_static)


# ---- 1. cold ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_cold_requests_are_misses_and_match_uncached(model, catalog, featurizer, make_request, block_size):
    core = make_core(model, catalog, block_size=block_size)
    reqs = cold_users(make_request, [(0, 0, 3), (7, 0, 5), (0, 4, 2), (13, 5, 9), (31, 2, 1), (2, 9, 17)])
    results = run(core, reqs)
    for req in reqs:
        res = results[req.request_id]
        assert (res.cache, res.cached_tokens, res.computed_tokens) == ("miss", 0, context_tokens(req))
        assert res.steps == 1  # everything fits one step of the default budget
        assert_scores(model, featurizer, req, res)
    stats = core.stats()["kv_cache"]
    assert (stats["misses"], stats["hits"], stats["partial_hits"], stats["users"]) == (len(reqs), 0, 0, len(reqs))
    assert_unpinned(core)


# ---- 2. warm: new real-time events appended -----------------------------------------------------------
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_new_realtime_events_compute_only_themselves(model, catalog, featurizer, make_request, block_size):
    rng = np.random.default_rng(2)
    core = make_core(model, catalog, block_size=block_size)
    previous = cold_users(make_request, [(5, 2, 4), (0, 0, 3), (12, 0, 6), (3, 6, 2)], seed=10)
    run(core, previous)
    for round_ in range(2):  # the second round extends the first round's extensions
        warm = [with_context(req, append_events(req.context, rng, 1 + (i + round_) % 3))
                for i, req in enumerate(previous)]
        results = run(core, warm)
        for old, req in zip(previous, warm):
            res = results[req.request_id]
            new_events = len(req.context.items) - len(old.context.items)
            assert (res.cache, res.cached_tokens, res.computed_tokens) == ("partial", context_tokens(old), new_events)
            assert_scores(model, featurizer, req, res)
        previous = warm
    assert core.stats()["kv_cache"]["partial_hits"] == 2 * len(previous)
    assert_unpinned(core)


# ---- 3. identical repeat ---------------------------------------------------------------------------
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_identical_repeat_is_a_hit(model, catalog, featurizer, make_request, block_size):
    core = make_core(model, catalog, block_size=block_size)
    reqs = cold_users(make_request, [(6, 3, 5), (0, 0, 2), (9, 0, 4)], seed=20)
    run(core, reqs)
    repeats = [with_context(r, r.context, request_ts=r.request_ts) for r in reqs]
    # the same contexts with other candidates at a later time: still a hit, candidates recomputed
    others = [with_context(r, r.context, candidates=np.arange(10, 17), request_ts=r.request_ts + 86_400)
              for r in reqs]
    for batch in (repeats, others):
        results = run(core, batch)
        for req in batch:
            res = results[req.request_id]
            assert (res.cache, res.cached_tokens, res.computed_tokens) == ("hit", context_tokens(req), 0)
            assert_scores(model, featurizer, req, res)
    assert core.stats()["kv_cache"]["hits"] == 2 * len(reqs)


# ---- 4. real-time events that are a prefix of the cached ones -----------------------------------------
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_prefix_of_cached_events_reuses_the_cache(model, catalog, featurizer, make_request, block_size):
    rng = np.random.default_rng(4)
    core = make_core(model, catalog, block_size=block_size)
    full = engine_request("u", make_request(8, 6, 5, seed=40))
    run_one(core, full)
    for keep in (4, 1, 0):
        short = with_context(full, truncate_realtime(full.context, keep))
        res = run_one(core, short)
        assert (res.cache, res.cached_tokens, res.computed_tokens) == ("hit", context_tokens(short), 0)
        assert_scores(model, featurizer, short, res)
    # from the shortest context, other new events; then the original long context again
    other = with_context(full, append_events(truncate_realtime(full.context, 0), rng, 3))
    res = run_one(core, other)
    assert (res.cache, res.cached_tokens, res.computed_tokens) == ("partial", context_tokens(full) - 6, 3)
    assert_scores(model, featurizer, other, res)
    again = with_context(full, full.context)
    res = run_one(core, again)
    assert res.cache in ("partial", "hit") and res.cached_tokens >= context_tokens(full) - 6
    assert_scores(model, featurizer, again, res)
    assert_unpinned(core)


# ---- 5. real-time events that diverge from the cached ones ---------------------------------------------
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("index", [0, 2, 5])
@pytest.mark.parametrize("change", ["item", "timestamp"])
def test_diverging_events_recompute_from_the_divergence(model, catalog, featurizer, make_request, block_size,
                                                        index, change):
    core = make_core(model, catalog, block_size=block_size)
    base = engine_request("u", make_request(7, 6, 6, seed=50 + index))
    run_one(core, base)
    ctx = base.context
    if change == "item":
        new_item = int(ctx.items[ctx.num_static + index]) % 40 + 1
        diverged = replace_realtime(ctx, index, item=new_item)
    else:
        diverged = replace_realtime(ctx, index, ts_shift=7)
    req = with_context(base, diverged)
    res = run_one(core, req)
    static = context_tokens(base) - 6
    assert (res.cache, res.cached_tokens, res.computed_tokens) == ("partial", static + index, 6 - index)
    assert_scores(model, featurizer, req, res)
    # diverging again, now with more events than cached
    rng = np.random.default_rng(index)
    longer = with_context(base, append_events(truncate_realtime(ctx, index), rng, 8 - index))
    res = run_one(core, longer)
    assert res.cached_tokens == static + index and res.computed_tokens == 8 - index
    assert_scores(model, featurizer, longer, res)
    assert_unpinned(core)


def test_events_differing_only_in_action_recompute_from_there(model, catalog, featurizer, make_request):
    """Same item and time, another action (rating): the event's token differs, so its K/V must too."""
    core = make_core(model, catalog, block_size=4)
    base = engine_request("u", make_request(5, 4, 6, seed=0))
    run_one(core, base)
    ctx = base.context
    req = with_context(base, replace_realtime(ctx, 2, rating=int(ctx.ratings[ctx.num_static + 2]) % 5 + 1))
    res = run_one(core, req)
    assert (res.cache, res.cached_tokens, res.computed_tokens) == ("partial", context_tokens(base) - 2, 2)
    assert_scores(model, featurizer, req, res)


def test_profile_change_without_version_bump_is_a_miss(model, catalog, featurizer, make_request):
    """The U tokens come from the profile: a changed profile invalidates every cached token."""
    core = make_core(model, catalog, block_size=3)
    base = engine_request("u", make_request(6, 3, 4, seed=1))
    run_one(core, base)
    ctx = base.context
    profile = ctx.profile.copy()
    profile[1] = profile[1] % 7 + 1  # another value of the second field (cardinality 8)
    req = with_context(base, UserContext(profile, ctx.items, ctx.timestamps, ctx.ratings, ctx.num_static))
    res = run_one(core, req)
    assert (res.cache, res.cached_tokens, res.computed_tokens) == ("miss", 0, context_tokens(req))
    assert_scores(model, featurizer, req, res)
    assert_unpinned(core)


# ---- 6. history-version bump -----------------------------------------------------------------------
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_history_version_bump_is_a_miss_and_drops_the_old_entry(model, catalog, featurizer, make_request,
                                                                block_size):
    rng = np.random.default_rng(6)
    core = make_core(model, catalog, block_size=block_size)
    base = engine_request("u", make_request(9, 4, 5, seed=60))
    other = engine_request("w", make_request(3, 1, 2, seed=61))
    run(core, [base, other])
    # same events at a new version (e.g. re-featurised history): a full recomputation
    bumped = with_context(base, base.context, version=1)
    res = run_one(core, bumped)
    assert (res.cache, res.cached_tokens, res.computed_tokens) == ("miss", 0, context_tokens(bumped))
    assert_scores(model, featurizer, bumped, res)
    cold = make_core(model, catalog, block_size=block_size)
    assert res.probabilities.equal(run_one(cold, with_context(bumped, bumped.context)).probabilities)
    # the usual roll: R folded into S under the next version, then new R events on top
    rolled = with_context(base, fold_realtime(base.context), version=2)
    res = run_one(core, rolled)
    assert (res.cache, res.cached_tokens) == ("miss", 0)
    assert_scores(model, featurizer, rolled, res)
    warm = with_context(rolled, append_events(rolled.context, rng, 2))
    res = run_one(core, warm)
    assert (res.cache, res.cached_tokens, res.computed_tokens) == ("partial", context_tokens(rolled), 2)
    assert_scores(model, featurizer, warm, res)
    # the old versions are gone: one entry per user, the new version, holding only its own blocks
    entries = core.cache.manager.entries
    assert set(entries) == {"u", "w"} and entries["u"].signature.version == 2
    assert core.stats()["kv_cache"]["users"] == 2
    blocks_needed = -(-context_tokens(warm) // block_size) + -(-context_tokens(other) // block_size)
    assert core.cache.num_blocks - len(core.cache.manager.free) == blocks_needed
    assert_unpinned(core)


def test_version_bump_after_eviction_to_host_is_a_miss(model, catalog, featurizer, make_request):
    """An evicted user's host copy is of the old version: the new version must not restore it."""
    per_user = context_tokens(make_request(10, 2, 3, seed=70))
    core = make_core(model, catalog, block_size=4, kv_cache_bytes=kv_bytes(model, 2 * per_user),
                     host_cache_bytes=kv_bytes(model, 10 * per_user))
    reqs = cold_users(make_request, [(10, 2, 3)] * 3, seed=70)
    for req in reqs:  # one at a time: u0 is evicted to the host tier by u2
        run_one(core, req)
    assert "u0" in core.cache.tiers[0].entries and "u0" not in core.cache.manager.entries
    bumped = with_context(reqs[0], reqs[0].context, version=1)
    state = core.add(bumped)
    res = run(core)[bumped.request_id]
    assert (res.cache, state.lookup.source, res.cached_tokens) == ("miss", "none", 0)
    assert_scores(model, featurizer, bumped, res)
    assert core.stats()["kv_cache"]["host_hits"] == 0


def test_version_bump_removes_the_old_host_copy(model, catalog, make_request):
    per_user = context_tokens(make_request(10, 2, 3, seed=70))
    core = make_core(model, catalog, block_size=4, kv_cache_bytes=kv_bytes(model, 2 * per_user),
                     host_cache_bytes=kv_bytes(model, 10 * per_user))
    reqs = cold_users(make_request, [(10, 2, 3)] * 3, seed=70)
    for req in reqs:
        run_one(core, req)
    assert core.cache.tiers[0].entries["u0"].signature.version == 0
    run_one(core, with_context(reqs[0], reqs[0].context, version=1))
    assert "u0" not in core.cache.tiers[0].entries


# ---- 7. eviction and refill --------------------------------------------------------------------------
ROUND_USERS = 5
SHAPE = (12, 2, 4)  # 4 U + 12 S + 2 R = 18 context tokens: 5 blocks of 4; 20 after 2 new events, still 5


TIERS = ["device-only", "host", "disk", "host+disk"]


def tiny_pool_core(model, catalog, tiers: str, tmp_path=None, **config):
    """A device pool of 11 blocks of 4 tokens: two users' contexts fit, a third does not. Lower tiers hold
    100 users; with both, the host tier holds one and hands older ones down to the disk."""
    if "host" in tiers:
        config["host_cache_bytes"] = kv_bytes(model, (18 if "disk" in tiers else 100 * 20))
    if "disk" in tiers:
        config.update(disk_cache_bytes=kv_bytes(model, 100 * 20), disk_cache_dir=str(tmp_path))
    return make_core(model, catalog, block_size=4, kv_cache_bytes=kv_bytes(model, 11 * 4), **config)


def tier_users(stats: dict) -> int:
    return stats.get("host_users", 0) + stats.get("disk_users", 0)


@pytest.mark.parametrize("tiers", TIERS)
def test_eviction_then_refill(model, catalog, featurizer, make_request, tiers, tmp_path):
    rng = np.random.default_rng(7)
    core = tiny_pool_core(model, catalog, tiers, tmp_path)
    lower = tiers != "device-only"
    assert core.cache.num_blocks == 11
    first = cold_users(make_request, [SHAPE] * ROUND_USERS, seed=80)
    for req in first:  # one user at a time, so every user past the second evicts the least recent one
        res = run_one(core, req)
        assert res.cache == "miss"
        assert_scores(model, featurizer, req, res)
    stats = core.stats()["kv_cache"]
    assert stats["evictions"] == ROUND_USERS - 2 and stats["users"] == 2
    if lower:
        assert tier_users(stats) == ROUND_USERS - 2
    if tiers == "host":
        assert stats["host_bytes_used"] == kv_bytes(model, 3 * 18)
    sources = []
    for old in first:  # every user comes back with 2 new events, after the others pushed it out
        req = with_context(old, append_events(old.context, rng, 2))
        state = core.add(req)
        res = run(core)[req.request_id]
        sources.append(state.lookup.source)
        if lower:
            assert state.lookup.source in tiers
            assert (res.cache, res.cached_tokens, res.computed_tokens) == ("partial", context_tokens(old), 2)
        else:
            assert (res.cache, res.computed_tokens) == ("miss", context_tokens(req))
        assert_scores(model, featurizer, req, res)
    if tiers == "host+disk":
        assert {"host", "disk"} <= set(sources), sources
    stats = core.stats()["kv_cache"]
    assert stats["evictions"] == 2 * ROUND_USERS - 2
    assert stats["host_hits"] + stats["disk_hits"] == (ROUND_USERS if lower else 0)
    assert stats["partial_hits"] == (ROUND_USERS if lower else 0)
    assert_unpinned(core)
    core.close()


@pytest.mark.parametrize("tiers", TIERS)
@pytest.mark.parametrize("max_batch_tokens", [16, 4096])
def test_many_users_at_once_through_a_tiny_pool(model, catalog, featurizer, make_request, tiers, max_batch_tokens,
                                                tmp_path):
    """More users admitted together than the pool holds: they wait for room, and every score is right."""
    rng = np.random.default_rng(8)
    core = tiny_pool_core(model, catalog, tiers, tmp_path, max_batch_tokens=max_batch_tokens)
    first = cold_users(make_request, [SHAPE] * ROUND_USERS, seed=90)
    for batch in (first, [with_context(r, append_events(r.context, rng, 2)) for r in first]):
        results = run(core, batch)
        assert len(results) == len(batch)
        for req in batch:
            assert_scores(model, featurizer, req, results[req.request_id])
        assert_unpinned(core)
    assert core.stats()["kv_cache"]["evictions"] >= ROUND_USERS
    core.close()


def test_cache_lookups_are_counted_once_per_request(model, catalog, make_request):
    core = tiny_pool_core(model, catalog, "device-only")
    run(core, cold_users(make_request, [SHAPE] * 4, seed=90))
    stats = core.stats()["kv_cache"]
    assert stats["hits"] + stats["partial_hits"] + stats["misses"] == 4


@pytest.mark.parametrize("tiers", TIERS[1:])
def test_tier_copies_survive_a_restore_that_must_wait(model, catalog, featurizer, make_request, tiers, tmp_path):
    core = tiny_pool_core(model, catalog, tiers, tmp_path)
    first = cold_users(make_request, [SHAPE] * ROUND_USERS, seed=140)
    run(core, first)  # two users stay on the device, three go to the tiers
    assert core.stats()["kv_cache"]["users"] + tier_users(core.stats()["kv_cache"]) == ROUND_USERS
    again = [with_context(r, r.context) for r in first]  # all at once: some restores must wait for room
    results = run(core, again)
    for req in again:
        assert_scores(model, featurizer, req, results[req.request_id])
    assert [results[r.request_id].cache for r in again] == ["hit"] * ROUND_USERS
    assert_unpinned(core)


# ---- 8. layer-chunked contexts ---------------------------------------------------------------------
@pytest.mark.parametrize("num_layers", [2, 3])
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_contexts_larger_than_the_step_budget_run_layer_chunked(model, mtgr_cfg, catalog, featurizer,
                                                                 make_request, num_layers, block_size):
    if num_layers != mtgr_cfg.num_layers:
        model = fixed_model(mtgr_cfg.model_copy(update={"num_layers": num_layers}))
    rng = np.random.default_rng(9)
    core = make_core(model, catalog, block_size=block_size, max_batch_tokens=16)
    plans = record_plans(core)
    # contexts of 39, 22 and 7 tokens against a 16-token budget, queued together
    reqs = cold_users(make_request, [(30, 5, 6), (12, 6, 4), (2, 1, 3)], seed=100)
    results = run(core, reqs)
    chunked = [p for p in plans if p.items and p.layers != (0, num_layers)]
    assert chunked, "no step ran a layer chunk"
    for plan in chunked:
        assert len(plan.items) == 1 and plan.items[0].cand_end == plan.items[0].cand_start
    for req in reqs:
        res = results[req.request_id]
        if context_tokens(req) > 16:
            assert res.steps > 1
        assert res.cache == "miss"
        assert_scores(model, featurizer, req, res)
    # a warm request with more new events than the budget: the new events are chunked
    req = with_context(reqs[1], append_events(reqs[1].context, rng, 20))
    plans.clear()
    res = run_one(core, req)
    assert (res.cache, res.cached_tokens, res.computed_tokens) == ("partial", context_tokens(reqs[1]), 20)
    assert res.steps > 1 and any(p.layers != (0, num_layers) for p in plans)
    assert_scores(model, featurizer, req, res)
    assert_unpinned(core)


# ---- 9. candidate micro-batches (M-FALCON) ---------------------------------------------------------------
@pytest.mark.parametrize("block_size", [3, 32])
def test_candidates_in_micro_batches(model, catalog, featurizer, make_request, block_size):
    core = make_core(model, catalog, block_size=block_size, max_batch_tokens=16)
    plans = record_plans(core)
    many = engine_request("a", make_request(6, 2, 40, seed=110))  # 12 context tokens, 40 candidates
    few = engine_request("b", make_request(3, 0, 7, seed=111))
    results = run(core, [many, few])
    res = results[many.request_id]
    assert res.steps >= 3
    assert_scores(model, featurizer, many, res)
    assert_scores(model, featurizer, few, results[few.request_id])
    spans = [(it.cand_start, it.cand_end) for p in plans for it in p.items if it.state.request is many]
    spans = [s for s in spans if s[1] > s[0]]
    assert len(spans) >= 3 and spans[0][0] == 0 and spans[-1][1] == 40
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans)), spans
    # warm: every micro-batch over the cached context, candidates in another order
    again = with_context(many, many.context, candidates=many.candidates[::-1].copy())
    res = run_one(core, again)
    assert res.cache == "hit" and res.steps >= 3
    assert_scores(model, featurizer, again, res)


# ---- 10. ragged mixed batches --------------------------------------------------------------------------
def follow_up(req, kind: str, rng: np.random.Generator):
    """A second request of the same user: repeat, extend, shorten, diverge or re-version its context."""
    ctx = req.context
    n_rt = len(ctx.items) - ctx.num_static
    if kind == "extend":
        return with_context(req, append_events(ctx, rng, int(rng.integers(1, 4))))
    if kind == "prefix":
        return with_context(req, truncate_realtime(ctx, int(rng.integers(0, n_rt + 1))))
    if kind == "diverge" and n_rt:
        j = int(rng.integers(0, n_rt))
        return with_context(req, append_events(truncate_realtime(ctx, j), rng, int(rng.integers(1, 4))))
    if kind == "bump":
        return with_context(req, ctx, version=req.history_version + 1)
    return with_context(req, ctx, candidates=rng.permutation(req.candidates))


EDGE_SHAPES = [(0, 0, 1), (0, 3, 1), (9, 0, 1), (20, 6, 12), (1, 1, 1)]
FOLLOW_UPS = ["repeat", "extend", "prefix", "diverge", "bump"]


def check_mixed_batches(model, catalog, featurizer, make_request, shapes, follow, block_size, max_batch_tokens,
                        seed):
    rng = np.random.default_rng(seed)
    core = make_core(model, catalog, block_size=block_size, max_batch_tokens=max_batch_tokens)
    first = cold_users(make_request, shapes, seed=seed)
    results = run(core, first)
    for req in first:
        assert_scores(model, featurizer, req, results[req.request_id])
    second = [follow_up(req, kind, rng) for req, kind in zip(first, follow)]
    second.append(engine_request("new", make_request(0, 0, 1, seed=seed)))  # a cold user among warm ones
    results = run(core, second)
    for req in second:
        assert_scores(model, featurizer, req, results[req.request_id])
    assert_unpinned(core)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("max_batch_tokens", [16, 4096])
def test_edge_shapes_in_one_batch(model, catalog, featurizer, make_request, block_size, max_batch_tokens):
    check_mixed_batches(model, catalog, featurizer, make_request, EDGE_SHAPES, FOLLOW_UPS, block_size,
                        max_batch_tokens, seed=120)


@settings(max_examples=15, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shapes=st.lists(st.tuples(st.integers(0, 24), st.integers(0, 7), st.integers(1, 14)), min_size=1, max_size=7),
       follow=st.lists(st.sampled_from(FOLLOW_UPS), min_size=7, max_size=7),
       block_size=st.sampled_from(BLOCK_SIZES), max_batch_tokens=st.sampled_from([16, 40, 4096]),
       seed=st.integers(0, 2**16))
def test_ragged_mixed_batches(model, catalog, featurizer, make_request, shapes, follow, block_size,
                              max_batch_tokens, seed):
    check_mixed_batches(model, catalog, featurizer, make_request, shapes, follow, block_size, max_batch_tokens,
                        seed)


# ---- model variants --------------------------------------------------------------------------------
@pytest.mark.parametrize("update", [{"rel_bias": True}, {"rel_bias": True, "normalizer": "max_len"},
                                    {"group_ln": False}], ids=["rel_bias", "rel_bias-max_len", "no-group_ln"])
def test_invariant_holds_for_model_variants(mtgr_cfg, catalog, featurizer, make_request, update):
    model = fixed_model(mtgr_cfg.model_copy(update=update), seed=1)
    check_mixed_batches(model, catalog, featurizer, make_request, [*EDGE_SHAPES, (30, 4, 30)], FOLLOW_UPS * 2, 3,
                        16, seed=130)


def test_the_engine_rejects_a_causal_mask_model(mtgr_cfg, catalog):
    """Candidates of a causal-mask model would see each other, so cached scoring cannot serve it: refused
    with the reason at construction (such a model is scored uncached)."""
    model = fixed_model(mtgr_cfg.model_copy(update={"mask": "causal"}))
    with pytest.raises(ValueError, match="mask: the engine serves MTGR's dynamic mask"):
        make_core(model, catalog, max_batch_tokens=16)
