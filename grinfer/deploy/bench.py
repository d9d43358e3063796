"""`grinfer deploy bench`: what a balancer costs and what affinity is worth, measured side by side.

The same replayed trace goes straight to one replica and through each balancer given: `users` users,
each with a fixed rank request (its own few real-time events and candidates) sent `repeats` times in a
shuffled order by `clients` closed loops, the targets taking turns round by round. Per target: p50/p99
latency, the latency added over the direct run, and the share of answers whose context came from a KV
cache (X-Grinfer-Cache) across whichever replicas answered (X-Grinfer-Replica): one replica's hit
ratio, the fleet's with affinity, the fleet's without. Every target gets user ids of its own, so each
starts with nothing cached; the bench's users are not in the store (cold-start users), so it writes
nothing. Loopback only, like `grinfer bench --server`.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from grinfer.bench.load import loopback_url, percentile

MAX_TRACE = 100_000


@dataclass
class TargetResult:
    name: str
    url: str
    requests: int
    errors: int
    p50_ms: float | None
    p99_ms: float | None
    hit_ratio: float | None  # answers whose context was (partly) cached / answers
    replicas: int  # distinct replicas that answered
    replicas_per_user: float  # mean over users of the replicas that answered them
    added_p50_ms: float | None = None  # over the direct run
    added_p99_ms: float | None = None


def trace(users: int, repeats: int, items: list[int], seed: int) -> list[tuple[int, dict]]:
    """(user index, request body without its user) for each request, shuffled; a user's body is fixed."""
    rng = random.Random(seed)
    bodies = []
    for _ in range(users):
        events = [{"item": i, "ts": 1_700_000_000 + n} for n, i in enumerate(rng.sample(items, min(8, len(items))))]
        bodies.append({"events": events, "candidates": [{"item": i} for i in rng.sample(items, min(16, len(items)))]})
    order = [u for u in range(users) for _ in range(repeats)]
    rng.shuffle(order)
    return [(u, bodies[u]) for u in order]


@dataclass
class _Tally:
    """What one target's answers add up to over the rounds."""

    latencies: list[float] = field(default_factory=list)
    cached: int = 0
    errors: int = 0
    served: dict[int, set[str]] = field(default_factory=dict)

    def result(self, name: str, url: str, requests: int) -> TargetResult:
        self.latencies.sort()
        answered = len(self.latencies)
        names = set().union(*self.served.values()) if self.served else set()
        return TargetResult(name, url, requests, self.errors, percentile(self.latencies, 50),
                            percentile(self.latencies, 99), self.cached / answered if answered else None, len(names),
                            sum(map(len, self.served.values())) / len(self.served) if self.served else 0.0)


async def replay(client: httpx.AsyncClient, prefix: str, requests: list[tuple[int, dict]], clients: int,
                 tally: _Tally) -> None:
    """Send requests through `client` with `clients` closed loops, as users `prefix`-N; count into `tally`."""
    queue = list(reversed(requests))

    async def loop() -> None:
        while queue:
            user, body = queue.pop()
            uid = f"{prefix}-{user}"
            start = time.perf_counter()
            try:
                r = await client.post("/v1/rank", json={"user": uid, **body}, headers={"X-User-Id": uid})
            except httpx.HTTPError:
                tally.errors += 1
                continue
            if r.status_code != 200:
                tally.errors += 1
                continue
            tally.latencies.append(1e3 * (time.perf_counter() - start))
            tally.cached += r.headers.get("x-grinfer-cache") in ("hit", "partial")
            tally.served.setdefault(user, set()).add(r.headers.get("x-grinfer-replica", "?"))
    await asyncio.gather(*(loop() for _ in range(clients)))


async def _catalogue_items(url: str) -> list[int]:
    """Item ids from the users' recent events (the bench ranks items the store knows)."""
    async with httpx.AsyncClient(base_url=loopback_url(url), timeout=30, trust_env=False) as client:
        users = (await client.get("/v1/users", params={"limit": 50})).json()["users"]
        items: set[int] = set()
        for user in users:
            items.update(e["item"] for e in (await client.get(f"/v1/users/{user}")).json()["recent"])
    if len(items) < 2:
        raise ValueError("--direct: the server's users have too few items in their recent events to rank")
    return sorted(items)


def run_bench(direct: str, via: dict[str, str], users: int = 40, repeats: int = 5, clients: int = 4,
              seed: int = 0, rounds: int = 4) -> list[TargetResult]:
    """The targets in turn, round after round (each round a share of the users, all their requests), so that
    a slow spell of a shared machine hits every target alike; `added_*` are each balancer's latency over the
    direct run's."""
    if not 1 <= users * repeats <= MAX_TRACE:
        raise ValueError(f"--users x --repeats must be 1..{MAX_TRACE}, got {users * repeats}")
    if clients < 1 or not 1 <= rounds <= users:
        raise ValueError(f"--clients must be >= 1 and --rounds 1..--users, got {clients} and {rounds}")
    targets = {"direct": direct, **via}
    run = uuid.uuid4().hex[:8]

    async def go() -> list[TargetResult]:
        requests = trace(users, repeats, await _catalogue_items(direct), seed)
        tallies = {name: _Tally() for name in targets}
        clients_of = {name: httpx.AsyncClient(base_url=loopback_url(url), timeout=60.0, trust_env=False)
                      for name, url in targets.items()}
        try:
            for k in range(rounds):
                share = [(u, body) for u, body in requests if u % rounds == k]
                for name in targets:  # user ids of each target's own: every target starts with nothing cached
                    await replay(clients_of[name], f"bench-{run}-{name}", share, clients, tallies[name])
        finally:
            for client in clients_of.values():
                await client.aclose()
        return [tallies[name].result(name, url, len(requests)) for name, url in targets.items()]

    results = asyncio.run(go())
    base = results[0]
    for r in results[1:]:
        if None not in (r.p50_ms, base.p50_ms, r.p99_ms, base.p99_ms):
            r.added_p50_ms, r.added_p99_ms = r.p50_ms - base.p50_ms, r.p99_ms - base.p99_ms  # type: ignore[operator]
    return results


def format_table(results: list[TargetResult]) -> str:
    ms = lambda v: "-" if v is None else f"{v:.2f}"
    lines = [f"{'target':<16} {'requests':>8} {'errors':>6} {'p50 ms':>8} {'p99 ms':>8} {'+p50 ms':>8} "
             f"{'+p99 ms':>8} {'KV hit':>7} {'replicas':>8} {'per user':>8}"]
    for r in results:
        hit = "-" if r.hit_ratio is None else f"{r.hit_ratio:.3f}"
        lines.append(f"{r.name:<16} {r.requests:>8} {r.errors:>6} {ms(r.p50_ms):>8} {ms(r.p99_ms):>8} "
                     f"{ms(r.added_p50_ms):>8} {ms(r.added_p99_ms):>8} {hit:>7} {r.replicas:>8} "
                     f"{r.replicas_per_user:>8.2f}")
    return "\n".join(lines)


def write_json(results: list[TargetResult], out: Path, settings: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": settings, "targets": [asdict(r) for r in results]}, indent=2) + "\n")
