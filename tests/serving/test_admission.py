"""Admission at the door: the bound follows the measured rate; past it, refusals are immediate 429s."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from test_rest import NUM_ITEMS, Stack

from grinfer.engine.request import Overloaded
from grinfer.serving.admission import Admission, at_door


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_bound_is_the_measured_rate_times_the_target_times_the_headroom():
    clock = Clock()
    gate = Admission(target_s=0.5, floor=2, ceiling=1000, window_s=1.0, headroom=0.5, initial=2, clock=clock)
    assert gate.bound() == 2  # no rate measured yet: the initial bound
    for _ in range(100):  # 100 requests served in one second
        with gate.admit():
            pass
    clock.now = 1.0
    with gate.admit():
        pass
    assert gate.rate == pytest.approx(100, rel=0.02) and gate.bound() == 25
    assert gate.bound(deadline_s=0.1) == 5  # a shorter deadline admits fewer
    held = [gate.admit() for _ in range(25)]
    for h in held:
        h.__enter__()
    with pytest.raises(Overloaded, match="saturated"), gate.admit():
        pass
    assert gate.refused == 1 and gate.in_flight == 25
    for h in held:
        h.__exit__(None, None, None)
    assert gate.in_flight == 0
    assert Admission(target_s=None).bound() is None  # no target: everything is admitted


def test_only_a_window_that_refused_requests_or_made_them_wait_can_lower_the_rate():
    clock = Clock()
    gate = Admission(target_s=1.0, floor=1, window_s=1.0, headroom=1.0, clock=clock)

    def serve(count: int) -> None:
        for _ in range(count):
            with gate.admit():
                pass

    serve(100)
    clock.now = 1.0
    serve(1)  # closes the first window: 100 a second
    assert gate.rate == pytest.approx(100, rel=0.02)
    serve(9)
    with gate._lock:  # the bound refused a request in this window: what it served is the server's capacity
        gate._refusal()
    clock.now = 2.0
    serve(1)
    assert gate.rate == pytest.approx((100 + 10) / 2, rel=0.02)
    for _ in range(5):  # quiet windows show what clients asked for, not capacity: the estimate stays
        clock.now += 1.0
        serve(1)
    assert gate.rate == pytest.approx(55, rel=0.02)
    clock.now += 1.0
    with gate.admit():  # the only request of its window took longer than the target: the server is slower
        clock.now += 1.5
    assert gate.rate == pytest.approx(0.5 * 55 + 0.5 / 1.5, rel=0.02)


def test_the_initial_bound_holds_until_the_server_is_seen_saturated():
    clock = Clock()
    gate = Admission(target_s=1.0, floor=1, window_s=1.0, headroom=1.0, initial=16, clock=clock)
    for _ in range(2):  # a trickle: 1 a second, served at once
        with gate.admit():
            pass
        clock.now += 1.0
    with gate.admit():
        pass
    assert gate.rate == pytest.approx(1, rel=0.02) and gate.bound() == 16  # a burst of 16 is still admitted
    held = [gate.admit() for _ in range(16)]
    for h in held:
        h.__enter__()
    with pytest.raises(Overloaded), gate.admit():  # the 17th
        pass
    clock.now += 1.0
    for h in held:
        h.__exit__(None, None, None)
    assert gate.saturated_once and gate.rate == pytest.approx(1.5) and gate.bound() == 1  # the measured bound


def test_past_saturation_only_200_and_429_and_refusals_do_no_work(tmp_path):
    stack = Stack(f"sqlite:///{tmp_path / 'a.db'}", "memory://")
    stack.service.admission = Admission(target_s=0.05, floor=2, window_s=0.2, initial=2)
    try:
        user = stack.service.store.list_users(1, 0)[0]
        body = {"user": user, "candidates": [{"item": stack.raw(i)} for i in range(1, NUM_ITEMS + 1)]}
        before = stack.engine.stats()["kv_cache"]

        async def burst():
            async with httpx.AsyncClient(base_url=stack.url, timeout=60) as http:
                return await asyncio.gather(*(http.post("/v1/rank", json=body) for _ in range(48)))

        answers = asyncio.run(burst())
        codes = [r.status_code for r in answers]
        assert set(codes) <= {200, 429} and codes.count(429) > 0 and codes.count(200) > 0
        assert all(r.headers["retry-after"] for r in answers if r.status_code == 429)
        after = stack.engine.stats()["kv_cache"]
        lookups = sum(after[k] - before[k] for k in ("hits", "partial_hits", "misses"))
        assert lookups == codes.count(200)  # a refused request never reached the engine
    finally:
        stack.close()


def test_behind_the_door_the_service_only_checks_a_shorter_deadline():
    gate = Admission(target_s=1.0, window_s=3600, initial=2)
    token = at_door.set(True)
    try:
        with gate.admit(), gate.admit():  # the front holds two places (this request's and another's)
            with gate.admit_here(None), gate.admit_here(5000):  # no shorter deadline: nothing more to check
                assert gate.in_flight == 2
    finally:
        at_door.reset(token)
    with gate.admit(), gate.admit(), pytest.raises(Overloaded):  # not behind the door: a place of its own
        with gate.admit_here(None):
            pass
