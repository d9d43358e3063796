"""`kill -9` of one replica under load, behind each real balancer: its users move to the others, the only
failed ranks are those in flight at the kill (counted), events are never retried (a failed one was
never acknowledged), no acknowledged event is lost, and the users move back once the replica returns."""

from __future__ import annotations

import random
import threading
import time
import uuid
from dataclasses import dataclass

import httpx

CLIENTS = 4
BEFORE_KILL_S, AFTER_KILL_S = 2.0, 4.0
DETECTION_S = 2.5  # HAProxy / Envoy: two failed 0.5 s /readyz checks; nginx: the first failed connection
MAX_SECONDS = 120.0  # the load's hard bound, whatever happens
TS = iter(range(2_500_000_000, 2_600_000_000))


@dataclass
class Outcome:
    kind: str  # "rank" or "event"
    user: str
    start: float
    end: float
    status: int | str  # HTTP status, or the transport error's name
    replica: str | None = None
    detail: str = ""  # the start of a failed answer's body (the balancer's own error text)


class Load:
    """CLIENTS closed loops through the balancer (3 ranks : 1 event), until stopped or MAX_SECONDS."""

    def __init__(self, url: str, users: list[str], items: list[int]) -> None:
        self.url, self.users, self.items = url, users, items
        self.outcomes: list[Outcome] = []
        self.acked: list[tuple[str, int]] = []  # (user, ts) of every acknowledged event
        self.lock, self.stopping = threading.Lock(), threading.Event()
        self.crashed: list[Exception] = []
        self.threads = [threading.Thread(target=self.loop, args=(i,), daemon=True) for i in range(CLIENTS)]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(timeout=90)

    def loop(self, seed: int) -> None:
        try:
            self.requests(seed)
        except Exception as exc:  # a broken client loop fails the test, never silently stops the load
            self.crashed.append(exc)
            raise

    def requests(self, seed: int) -> None:
        rng, deadline = random.Random(seed), time.monotonic() + MAX_SECONDS
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self.stopping.is_set() and time.monotonic() < deadline:
                user = rng.choice(self.users)
                if rng.random() < 0.25:
                    self.event(client, user, rng.choice(self.items))
                else:
                    self.call(client, "rank", user, "/v1/rank",
                              {"user": user, "candidates": [{"item": i} for i in rng.sample(self.items, 4)]})

    def event(self, client: httpx.Client, user: str, item: int) -> None:
        ts = next(TS)
        r = self.call(client, "event", user, "/v1/events", {"user": user, "events": [{"item": item, "ts": ts}]},
                      {"Idempotency-Key": uuid.uuid4().hex})
        if r is not None and r.status_code == 200:
            with self.lock:
                self.acked.append((user, ts))

    def call(self, client: httpx.Client, kind: str, user: str, path: str, body: dict,
             headers: dict | None = None) -> httpx.Response | None:
        start = time.monotonic()
        try:
            r = client.post(path, json=body, headers={"X-User-Id": user, **(headers or {})})
        except httpx.TransportError as exc:
            outcome, r = Outcome(kind, user, start, time.monotonic(), type(exc).__name__), None
        else:
            outcome = Outcome(kind, user, start, time.monotonic(), r.status_code, r.headers.get("x-grinfer-replica"),
                              r.text[:160] if r.status_code != 200 else "")
        with self.lock:
            self.outcomes.append(outcome)
        return r

    def since(self, t: float) -> list[Outcome]:
        with self.lock:
            return [o for o in self.outcomes if o.start >= t]


def known_items(fleet) -> list[int]:
    """Catalogue items, from the users' recent events (at least 4 distinct ones)."""
    with httpx.Client(base_url=fleet.replicas[0].url, timeout=10) as client:
        items = sorted({e["item"] for u in fleet.users for e in client.get(f"/v1/users/{u}").json()["recent"]})
    assert len(items) >= 4
    return items


def test_kill_9_moves_users_counts_in_flight_errors_and_loses_no_ack(fleet, balancer):
    victim = fleet.replicas[1]
    items = known_items(fleet)
    moved = [u for u in fleet.users if balancer.served_by(u) == victim.name]
    assert moved, "the victim serves none of the users"
    try:
        with Load(balancer.url, fleet.users, items) as load:
            time.sleep(BEFORE_KILL_S)
            kill_sent = time.monotonic()
            victim.kill()
            killed_at = time.monotonic()  # the process is gone (reaped): its sockets are closed
            time.sleep(AFTER_KILL_S)
            outage = load.since(killed_at + DETECTION_S)
            victim.start()
            victim.wait_ready()
            balancer.wait_whole_ring(fleet.users)
        outcomes = load.outcomes
    finally:
        if victim.proc is None or victim.proc.poll() is not None:
            victim.start()
            victim.wait_ready()

    assert not load.crashed
    failed = [o for o in outcomes if o.status != 200]
    in_flight = [o for o in outcomes if o.start < killed_at and o.end > kill_sent]
    failed_ranks = [o for o in failed if o.kind == "rank"]
    failed_events = [o for o in failed if o.kind == "event"]
    print(f"\n{balancer.kind}: {len(outcomes)} requests, {len(in_flight)} in flight at the kill "
          f"({1e3 * (killed_at - kill_sent):.0f} ms from SIGKILL to reaped); failed: "
          f"{len(failed_ranks)} ranks, {len(failed_events)} events (never retried), "
          f"{sum(o.kind == 'event' for o in outcomes) - len(failed_events)} events acknowledged")
    assert all(o in in_flight for o in failed_ranks), [(round(o.start - killed_at, 3), o.status, o.detail)
                                                       for o in failed_ranks if o not in in_flight]
    assert len(failed_ranks) <= CLIENTS
    # the outage after detection: the victim's users are served by the others, and no rank fails
    served = [o for o in outage if o.status == 200]
    assert served and all(o.replica != victim.name for o in served)
    assert {o.user for o in served} & set(moved)
    assert not [o for o in outage if o.kind == "rank" and o.status != 200]
    # back: the victim serves its users again
    assert all(balancer.served_by(u) == victim.name for u in moved)
    # nothing acknowledged is lost
    stored = set(fleet.db.query("SELECT u.id, e.ts FROM events e JOIN users u ON u.uid = e.uid WHERE e.ts >= %s",
                                2_500_000_000))
    assert set(load.acked) <= stored
    assert load.acked
