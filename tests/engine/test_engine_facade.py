"""The threaded `Engine` facade: concurrent callers (asyncio tasks and threads) get correct scores,
shutdown drains or fails every admitted request, errors reach the caller."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from engine_util import append_events, assert_scores, engine_request, kv_bytes, with_context

from grinfer.config import EngineConfig
from grinfer.engine import ContextTooLarge, DeadlineExceeded, Engine, EngineError, RankResult

TIMEOUT = 60.0  # seconds; only so that a hung engine fails the test instead of the run


def user_requests(make_request, num_users: int, per_user: int, seed: int = 0):
    """per_user requests for each user: a base context, then extensions and repeats of it, interleaved."""
    rng = np.random.default_rng(seed)
    by_user = []
    for u in range(num_users):
        base = engine_request(f"u{u}", make_request(3 + 4 * u, u % 3, 2 + u, seed=seed + u))
        reqs = [base]
        for i in range(1, per_user):
            prev = reqs[-1]
            ctx = prev.context if i % 3 == 2 else append_events(prev.context, rng, 1 + i % 2)
            reqs.append(with_context(prev, ctx, candidates=rng.permutation(np.arange(1, 41))[: 1 + (i * 7) % 12]))
        by_user.append(reqs)
    return [r for group in zip(*by_user) for r in group]


def config(**kw) -> EngineConfig:
    return EngineConfig(kv_cache_bytes=4 << 20, max_batch_tokens=kw.pop("max_batch_tokens", 48), **kw)


@contextlib.contextmanager
def serving(model, catalog, cfg: EngineConfig):
    """A started Engine; drained on success, stopped without draining when the test failed (never hangs)."""
    engine = Engine(model, catalog, cfg).start()
    try:
        yield engine
    except BaseException:
        engine.shutdown(drain=False)
        raise
    shutdown(engine, drain=True)


def shutdown(engine: Engine, drain: bool) -> None:
    """engine.shutdown(drain), failing the test if it does not return in time."""
    thread = threading.Thread(target=engine.shutdown, kwargs={"drain": drain}, daemon=True)
    thread.start()
    thread.join(TIMEOUT)
    assert not thread.is_alive(), f"shutdown(drain={drain}) did not return within {TIMEOUT} s"


def test_rank_sync_matches_uncached(model, catalog, featurizer, make_request):
    reqs = user_requests(make_request, 1, 3)
    with serving(model, catalog, config()) as engine:
        results = [engine.rank_sync(r, timeout=TIMEOUT) for r in reqs]
    assert [r.cache for r in results] == ["miss", "partial", "hit"]  # base, extension, repeat
    for req, res in zip(reqs, results):
        assert_scores(model, featurizer, req, res)


def test_many_asyncio_tasks_at_once(model, catalog, featurizer, make_request):
    reqs = user_requests(make_request, 5, 4, seed=10)
    assert len(reqs) == 20

    async def main(engine):
        return await asyncio.gather(*(engine.rank(r) for r in reqs))

    with serving(model, catalog, config()) as engine:
        results = asyncio.run(asyncio.wait_for(main(engine), TIMEOUT))
        stats = engine.stats()
    for req, res in zip(reqs, results):
        assert isinstance(res, RankResult) and res.request_id == req.request_id
        assert_scores(model, featurizer, req, res)
    assert stats["kv_cache"]["users"] == 5
    assert stats["waiting"] == stats["running"] == 0


def test_many_threads_calling_rank_sync(model, catalog, featurizer, make_request):
    reqs = user_requests(make_request, 4, 4, seed=20)
    with serving(model, catalog, config(max_batch_tokens=16)) as engine, ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda r: engine.rank_sync(r, timeout=TIMEOUT), reqs))
    for req, res in zip(reqs, results):
        assert_scores(model, featurizer, req, res)


def test_shutdown_with_drain_completes_admitted_requests(model, catalog, featurizer, make_request):
    reqs = user_requests(make_request, 4, 3, seed=30)
    engine = Engine(model, catalog, config(max_batch_tokens=16)).start()
    futures = [engine.submit(r) for r in reqs]
    shutdown(engine, drain=True)
    assert all(f.done() for f in futures)
    for req, future in zip(reqs, futures):
        assert_scores(model, featurizer, req, future.result(timeout=0))
    with pytest.raises(EngineError):
        engine.submit(reqs[0])
    with pytest.raises(EngineError):
        engine.rank_sync(reqs[0])


def test_shutdown_without_drain_resolves_every_future(model, catalog, featurizer, make_request):
    reqs = user_requests(make_request, 4, 3, seed=40)
    engine = Engine(model, catalog, config(max_batch_tokens=16)).start()
    futures = [engine.submit(r) for r in reqs]
    shutdown(engine, drain=False)
    for req, future in zip(reqs, futures):
        try:
            res = future.result(timeout=TIMEOUT)
        except EngineError:
            continue  # not run before the shutdown: failed, not lost
        assert_scores(model, featurizer, req, res)


def test_submit_before_start_raises(model, catalog, make_request):
    engine = Engine(model, catalog, config())
    with pytest.raises(EngineError, match="not running"):
        engine.submit(engine_request("u", make_request(2, 1, 2)))


def test_errors_reach_the_caller(model, catalog, featurizer, make_request):
    pool_tokens = 16
    cfg = EngineConfig(block_size=4, max_realtime=5, kv_cache_bytes=kv_bytes(model, pool_tokens))
    with serving(model, catalog, cfg) as engine:
        with pytest.raises(ContextTooLarge):
            engine.rank_sync(engine_request("big", make_request(pool_tokens, 0, 2)), timeout=TIMEOUT)
        with pytest.raises(ValueError, match="max_realtime"):
            asyncio.run(engine.rank(engine_request("rt", make_request(0, 6, 2))))
        late = engine_request("late", make_request(2, 1, 2), deadline=time.monotonic() - 1.0)
        with pytest.raises(DeadlineExceeded):
            engine.rank_sync(late, timeout=TIMEOUT)
        ok = engine_request("ok", make_request(2, 1, 2))
        assert_scores(model, featurizer, ok, engine.rank_sync(ok, timeout=TIMEOUT))


def test_stats_report_kv_cache_numbers(model, catalog, make_request):
    reqs = user_requests(make_request, 2, 2, seed=50)
    with serving(model, catalog, config()) as engine:
        for req in reqs:
            engine.rank_sync(req, timeout=TIMEOUT)
        stats = engine.stats()
    kv = stats["kv_cache"]
    for key in ("hits", "partial_hits", "misses", "evictions", "host_hits", "hit_ratio", "occupancy", "users",
                "blocks", "block_size"):
        assert key in kv, key
    assert kv["misses"] == 2 and kv["partial_hits"] == 2 and kv["hit_ratio"] == 0.5
    assert kv["users"] == 2 and 0.0 < kv["occupancy"] <= 1.0 and stats["steps"] >= 4


def test_a_cancelled_caller_does_not_stop_the_engine(model, catalog, featurizer, make_request):
    entered, gate = threading.Event(), threading.Event()

    def hold(_stats):  # the engine thread waits here after each computing step until the gate opens
        entered.set()
        gate.wait(TIMEOUT)

    engine = Engine(model, catalog, config(), on_step=hold).start()
    try:
        early = engine_request("a", make_request(3, 1, 2, seed=1))
        first = engine.submit(early)
        assert entered.wait(TIMEOUT)  # the engine is between steps: what is submitted now stays pending

        async def give_up():
            task = asyncio.create_task(engine.rank(engine_request("b", make_request(3, 1, 2, seed=2))))
            await asyncio.sleep(0)  # the request is submitted
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(give_up())
        later = engine_request("c", make_request(4, 2, 3, seed=3))
        future = engine.submit(later)
        gate.set()
        assert_scores(model, featurizer, early, first.result(TIMEOUT))
        deadline = time.monotonic() + TIMEOUT
        while not future.done() and engine.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert future.done(), "the engine stopped serving after a caller cancelled"
        assert_scores(model, featurizer, later, future.result(0))
    finally:
        gate.set()
        shutdown(engine, drain=False)


def test_requests_sharing_an_id_each_get_their_own_result(model, catalog, featurizer, make_request):
    req = engine_request("a", make_request(3, 1, 2, seed=4))
    other = dataclasses.replace(req, candidates=np.array([5, 6, 7]))
    assert other.request_id == req.request_id
    with serving(model, catalog, config()) as engine:
        first = engine.submit(req)
        try:
            second = engine.submit(other)
        except (EngineError, ValueError):  # rejecting the duplicate id is fine too
            second = None
    assert first.done(), "the first caller's future was lost"
    assert_scores(model, featurizer, req, first.result(0))
    if second is not None:
        assert_scores(model, featurizer, other, second.result(0))


def settle(engine: Engine, future) -> None:
    """Wait until the future resolves or the engine thread is gone (then it never will)."""
    deadline = time.monotonic() + TIMEOUT
    while not future.done() and engine.running and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_failing_step_hook_loses_no_request(model, catalog, featurizer, make_request):
    def hook(_stats):
        raise RuntimeError("metrics exporter broke")

    engine = Engine(model, catalog, config(), on_step=hook).start()
    try:
        req = engine_request("a", make_request(3, 1, 2, seed=5))
        future = engine.submit(req)
        settle(engine, future)
        assert future.done(), "an admitted request was lost"
        if future.exception() is None:
            assert_scores(model, featurizer, req, future.result(0))
        else:
            assert isinstance(future.exception(), EngineError)
        later = engine_request("b", make_request(4, 2, 3, seed=6))
        try:
            future = engine.submit(later)
        except EngineError:
            return  # refusing new work once the loop is gone is fine
        settle(engine, future)
        assert future.done(), "a request accepted after the loop died was lost"
    finally:
        shutdown(engine, drain=False)
