"""The pipelined engine (pipeline_depth 2: step N+1 planned and launched before step N is waited for)
against the synchronous one (depth 1) on random arrival traces: the same requests succeed, the same ones
miss their deadline, and every score equals the uncached model's — through evictions, tier restores,
layer-chunked contexts, candidate micro-batches and same-user follow-ups."""

from __future__ import annotations

import time

import numpy as np
import torch
from engine_util import (
    ATOL,
    append_events,
    assert_scores,
    assert_unpinned,
    engine_request,
    kv_bytes,
    make_core,
    with_context,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grinfer.engine import DeadlineExceeded, RankResult

Arrival = tuple[int, int, int, int, int, bool]  # tick, user, num_static, num_realtime, num_candidates, expired


def build_trace(make_request, arrivals: list[Arrival], seed: int):
    """(tick, request) pairs; a user's later arrivals extend its previous context (warm follow-ups)."""
    rng = np.random.default_rng(seed)
    last: dict[int, object] = {}
    trace = []
    for i, (tick, user, n_static, n_rt, n_cand, expired) in enumerate(sorted(arrivals, key=lambda a: a[0])):
        deadline = time.monotonic() - 1.0 if expired else None
        if user in last and i % 2:
            req = with_context(last[user], append_events(last[user].context, rng, n_rt % 3), deadline=deadline)
        else:
            req = engine_request(f"u{user}", make_request(n_static, n_rt, n_cand, seed=seed + i), deadline=deadline)
        last[user] = req
        trace.append((tick, req))
    return trace


def replay(core, trace, max_ticks: int = 5000) -> dict:
    """Add each request at its tick, one engine step per tick; results by request id."""
    pending, out, tick = list(trace), {}, 0
    while pending or core.has_work():
        while pending and pending[0][0] <= tick:
            core.add(pending.pop(0)[1])
        for state, result in core.step():
            out[state.request.request_id] = result
        tick += 1
        assert tick < max_ticks, core.stats()
    return out


@settings(max_examples=12, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(arrivals=st.lists(st.tuples(st.integers(0, 12), st.integers(0, 6), st.integers(0, 20), st.integers(0, 6),
                                   st.integers(1, 30)), min_size=1, max_size=14),
       expired=st.lists(st.integers(0, 13), max_size=3),
       tiers=st.sampled_from(["device-only", "host", "disk"]),
       max_batch_tokens=st.sampled_from([16, 48, 4096]), block_size=st.sampled_from([1, 4, 32]),
       seed=st.integers(0, 2**16))
def test_pipelined_and_synchronous_engines_agree(model, catalog, featurizer, make_request, tmp_path_factory,
                                                 arrivals, expired, tiers, max_batch_tokens, block_size, seed):
    arrivals = [(*a, i in expired) for i, a in enumerate(arrivals)]
    trace = build_trace(make_request, arrivals, seed)
    results = {}
    for depth in (1, 2):
        tier_config = {}
        if tiers == "host":
            tier_config["host_cache_bytes"] = kv_bytes(model, 2000)
        elif tiers == "disk":
            tier_config.update(disk_cache_bytes=kv_bytes(model, 2000),
                               disk_cache_dir=str(tmp_path_factory.mktemp(f"kv{depth}")))
        # a pool of about three users' contexts: evictions (and restores from the tier) happen
        core = make_core(model, catalog, pipeline_depth=depth, cpu_device_thread=depth > 1,
                         max_batch_tokens=max_batch_tokens,
                         block_size=block_size, kv_cache_bytes=kv_bytes(model, 120), **tier_config)
        results[depth] = replay(core, trace)
        assert_unpinned(core)
        assert not core.runner.table, "the runner kept tensors of finished requests"
        core.close()
    for _, req in trace:
        sync, piped = results[1][req.request_id], results[2][req.request_id]
        if req.deadline is not None:
            assert isinstance(sync, DeadlineExceeded) and isinstance(piped, DeadlineExceeded)
            continue
        assert isinstance(sync, RankResult) and isinstance(piped, RankResult), (sync, piped)
        torch.testing.assert_close(piped.probabilities, sync.probabilities, atol=ATOL, rtol=0)
        assert_scores(model, featurizer, req, piped)


def test_the_pipeline_plans_the_next_step_before_waiting_for_the_last(model, catalog, make_request):
    """With depth 2, step N+1 is launched while step N is still in flight (on the CPU: the worker thread)."""
    core = make_core(model, catalog, pipeline_depth=2, cpu_device_thread=True, max_batch_tokens=16)
    launched, waited = [], []
    launch = core.runner.launch

    def recording_launch(plan, *args):
        output = launch(plan, *args)
        launched.append(len(waited))
        wait = output.wait

        def recording_wait():
            waited.append(len(launched))
            wait()
        output.wait = recording_wait
        return output

    core.runner.launch = recording_launch
    req = engine_request("a", make_request(6, 2, 40, seed=3))  # 12 context tokens + 40 candidates: 4+ steps
    for _ in range(100):
        if not core.has_work() and launched:
            break
        if not launched:
            core.add(req)
        core.step()
    assert len(launched) >= 3
    # the second step was launched before the first was waited for, and so on
    assert launched[:3] == [0, 0, 1] and waited[0] == 2
    assert core.stats()["pipeline_depth"] == 2
