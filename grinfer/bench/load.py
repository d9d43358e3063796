"""Closed-loop HTTP load against a running grinfer server (`grinfer bench --server URL`).

Each of N client loops sends one request, waits for the answer, and sends the next, until the
level's request budget or time budget is spent; several levels of N run one after another. Per
level it reports counts by status, latency percentiles of OK answers, throughput and the server's
KV-cache hit ratio over the level (from /metrics). It only ever talks to the local machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import multiprocessing
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from grinfer.bench.figure import panels
from grinfer.bench.protocols import PROTOCOLS, Send, rest_sender

ENDPOINTS = ("recommend", "rank")
MAX_REQUESTS, MAX_DURATION_S, MAX_CLIENTS = 100_000, 600.0, 1024
KV_GAUGES = ("hits", "partial_hits", "misses")


def loopback_url(url: str) -> str:
    """The base URL (no trailing slash) if it names this machine over http(s); ValueError otherwise."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--server must be an http:// URL such as http://127.0.0.1:8000, got {url!r}")
    host = parts.hostname
    try:
        local = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: never resolved, so it cannot lead anywhere but here
        local = False
    if not local:
        raise ValueError(f"--server {url!r}: only loopback addresses (localhost, 127.0.0.1, ::1) may be "
                         f"load-tested; this tool never sends load to another host")
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def parse_clients(values: list[str] | list[int]) -> list[int]:
    """'1,8,32' and/or repeated values -> [1, 8, 32] (each 1..MAX_CLIENTS)."""
    levels: list[int] = []
    for value in values:
        for part in str(value).split(","):
            if not part.strip():
                continue
            try:
                n = int(part)
            except ValueError:
                raise ValueError(f"--clients expects integers, got {part.strip()!r}") from None
            if not 1 <= n <= MAX_CLIENTS:
                raise ValueError(f"--clients must be between 1 and {MAX_CLIENTS}, got {n}")
            levels.append(n)
    if not levels:
        raise ValueError("--clients: give at least one level")
    return levels


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Linear-interpolated q-th percentile (0..100) of an ascending list; None when empty."""
    if not sorted_values:
        return None
    pos = (len(sorted_values) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def parse_kv_metrics(text: str) -> dict[str, float]:
    """grinfer_kv_cache_{hits,partial_hits,misses}_total counter values from a Prometheus text page."""
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        key = name.removeprefix("grinfer_kv_cache_").removesuffix("_total")
        if key != name and key in KV_GAUGES:
            out[key] = float(value.split()[0])
    return out


@dataclass
class LevelResult:
    """One concurrency level's outcome; latencies in milliseconds, rates per second."""

    clients: int
    requests: int
    ok: int
    rejected_429: int
    errors: dict[str, int]  # other outcomes: HTTP status or transport error name -> count
    seconds: float
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    ok_per_s: float
    requests_per_s: float
    candidates: int | None = None  # per rank request (None for recommend: the server retrieves them)
    kv_delta: dict[str, float] | None = None  # hits / partial_hits / misses during the level
    kv_hit_ratio: float | None = None  # (hits + partial_hits) / lookups during the level
    # OK answers by the replica that served them (X-Grinfer-Replica) and their context's cache status
    replicas: dict[str, dict[str, int]] = field(default_factory=dict)
    rejected_p50_ms: float | None = None  # latency of the 429 answers
    rejected_p99_ms: float | None = None
    latencies_ms: list[float] = field(default_factory=list, repr=False)

    @property
    def answer_hit_ratio(self) -> float | None:
        """Share of OK answers whose context came (wholly or partly) from a KV cache, over every replica that
        answered: the fleet's hit ratio, where one server's /metrics sees only its own lookups."""
        counts = Counter()
        for statuses in self.replicas.values():
            counts.update(statuses)
        lookups = counts["hit"] + counts["partial"] + counts["miss"]
        return (counts["hit"] + counts["partial"]) / lookups if lookups else None


def by_replica(served: Counter) -> dict[str, dict[str, int]]:
    """{replica: {cache status: OK answers}} from counts keyed by (replica, cache status)."""
    out: dict[str, dict[str, int]] = {}
    for (replica, cache), n in sorted(served.items()):
        out.setdefault(replica, {})[cache] = n
    return out


class Workload:
    """Request bodies for one endpoint, drawn from the server's own users and items."""

    def __init__(self, endpoint: str, users: list[str], items: list[int], candidates: int, k: int, seed: int):
        self.endpoint, self.users, self.items = endpoint, users, items
        self.candidates, self.k, self.seed = min(candidates, len(items)) if items else 0, k, seed
        self.rng = random.Random(seed)

    def body(self) -> dict:
        user = self.rng.choice(self.users)
        if self.endpoint == "recommend":
            return {"user": user, "k": self.k}
        return {"user": user, "candidates": [{"item": i} for i in self.rng.sample(self.items, self.candidates)]}


async def prepare(client: httpx.AsyncClient, endpoint: str, candidates: int, k: int, seed: int,
                  probe_users: int = 8, max_probe_users: int = 64) -> Workload:
    """Fetch known users (and, for rank, the items in a few users' recent events) from the server.

    Rank candidates come from `probe_users` users' recent events, or more users (up to `max_probe_users`)
    until there are `candidates` distinct items; with fewer, every request ranks all that were found.
    """
    r = await client.get("/v1/users", params={"limit": 1000})
    r.raise_for_status()
    users = [str(u) for u in r.json()["users"]]
    if not users:
        raise ValueError("the server knows no users (GET /v1/users is empty); import a dataset first")
    items: list[int] = []
    if endpoint == "rank":
        seen: set[int] = set()
        probe = random.Random(seed).sample(users, min(max_probe_users, len(users)))
        for n, user in enumerate(probe):
            if n >= probe_users and len(items) >= candidates:
                break
            r = await client.get(f"/v1/users/{user}")
            r.raise_for_status()
            for event in r.json()["recent"]:
                if event["item"] not in seen:
                    seen.add(event["item"])
                    items.append(event["item"])
        if not items:
            raise ValueError("found no items in the users' recent events to use as rank candidates")
    return Workload(endpoint, users, items, candidates, k, seed)


async def kv_counts(client: httpx.AsyncClient) -> dict[str, float] | None:
    try:
        r = await client.get("/metrics")
    except httpx.HTTPError:
        return None
    return kv_of_page(r.text) if r.status_code == 200 else None


def kv_of_page(text: str) -> dict[str, float] | None:
    """The KV-cache counters of a /metrics page, or None when any is missing."""
    counts = parse_kv_metrics(text)
    return counts if len(counts) == len(KV_GAUGES) else None


async def run_level(client: httpx.AsyncClient, workload: Workload, clients: int, requests: int,
                    duration_s: float, send: Send | None = None, backoff_s: float = 0.0) -> LevelResult:
    """`clients` closed loops until `requests` have been sent or `duration_s` has passed (over REST, or `send`);
    a loop that got a 429 waits `backoff_s` before its next request (0: at once, as wrk does)."""
    before = await kv_counts(client)
    outcome = await _closed_loops(send or rest_sender(client, workload.endpoint), workload, clients, requests,
                                  duration_s, backoff_s)
    return _level(workload, clients, outcome, before, await kv_counts(client))


def run_level_spread(base_url: str, workload: Workload, clients: int, requests: int, duration_s: float,
                     processes: int, timeout_s: float = 60.0) -> LevelResult:
    """`run_level` with its closed loops spread over `processes` client processes: one asyncio + httpx
    process saturates near a few hundred requests a second, below what a server with workers answers."""
    processes = max(1, min(processes, clients))
    with httpx.Client(base_url=base_url, timeout=timeout_s, trust_env=False) as client:
        before = kv_of_page(client.get("/metrics").text)
        shares = [clients // processes + (i < clients % processes) for i in range(processes)]
        budgets = [requests // processes + (i < requests % processes) for i in range(processes)]
        jobs = [(base_url, workload.endpoint, workload.users, workload.items, workload.candidates, workload.k,
                 workload.seed + i, n, budget, duration_s, timeout_s) for i, (n, budget) in enumerate(zip(shares,
                                                                                                          budgets))]
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            parts = pool.starmap(_loops_in_process, jobs)
        after = kv_of_page(client.get("/metrics").text)
    statuses: Counter[str] = Counter()
    served: Counter[tuple[str, str]] = Counter()
    for part in parts:
        statuses.update(part[0])
        served.update(part[4])
    outcome = (statuses, [x for part in parts for x in part[1]], sum(p[2] for p in parts), max(p[3] for p in parts),
               served, [x for part in parts for x in part[5]])
    return _level(workload, clients, outcome, before, after)


def _loops_in_process(base_url: str, endpoint: str, users: list[str], items: list[int], candidates: int, k: int,
                      seed: int, clients: int, requests: int, duration_s: float, timeout_s: float) -> tuple:
    async def go():
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits, trust_env=False,
                                     follow_redirects=False) as client:
            workload = Workload(endpoint, users, items, candidates, k, seed)
            return await _closed_loops(rest_sender(client, endpoint), workload, clients, requests, duration_s)

    return asyncio.run(go())


async def _closed_loops(send: Send, workload: Workload, clients: int, requests: int, duration_s: float,
                        backoff_s: float = 0.0) -> tuple[Counter, list[float], int, float, Counter, list[float]]:
    """(outcomes by status, OK latencies in ms, requests sent, seconds, OK answers by (replica, cache status),
    429 latencies in ms) of `clients` closed loops; each request names its user in X-User-Id, the key
    user-affine balancers hash. A loop waits `backoff_s` after a 429."""
    statuses: Counter[str] = Counter()
    served: Counter[tuple[str, str]] = Counter()  # OK answers by (X-Grinfer-Replica, X-Grinfer-Cache)
    latencies: list[float] = []
    rejected: list[float] = []
    sent = 0
    start = time.perf_counter()
    deadline = start + duration_s

    async def loop() -> None:
        nonlocal sent
        while sent < requests and time.perf_counter() < deadline:
            sent += 1  # no await between the check and the increment: the budget is exact
            body = workload.body()
            t0 = time.perf_counter()
            outcome, answered = await send(body)
            if outcome == "200" and answered is not None:  # a 200 always names its replica and cache status
                latencies.append(1e3 * (time.perf_counter() - t0))
                served[answered] += 1
            elif outcome == "429":
                rejected.append(1e3 * (time.perf_counter() - t0))
                if backoff_s:
                    await asyncio.sleep(min(backoff_s, max(0.0, deadline - time.perf_counter())))
            statuses[outcome] += 1

    await asyncio.gather(*(loop() for _ in range(clients)))
    return statuses, latencies, sent, time.perf_counter() - start, served, rejected


def _level(workload: Workload, clients: int, outcome: tuple, before: dict | None, after: dict | None) -> LevelResult:
    statuses, latencies, sent, seconds, served, rejected_ms = outcome
    latencies.sort()
    rejected_ms.sort()
    ok, rejected = statuses.pop("200", 0), statuses.pop("429", 0)
    delta = ratio = None
    if before is not None and after is not None:
        delta = {k: after[k] - before[k] for k in KV_GAUGES}
        lookups = sum(delta.values())
        ratio = (delta["hits"] + delta["partial_hits"]) / lookups if lookups else None
    return LevelResult(clients=clients, requests=sent, ok=ok, rejected_429=rejected, errors=dict(statuses),
                       seconds=seconds, p50_ms=percentile(latencies, 50), p90_ms=percentile(latencies, 90),
                       p99_ms=percentile(latencies, 99), ok_per_s=ok / seconds, requests_per_s=sent / seconds,
                       candidates=workload.candidates if workload.endpoint == "rank" else None,
                       kv_delta=delta, kv_hit_ratio=ratio, latencies_ms=latencies, replicas=by_replica(served),
                       rejected_p50_ms=percentile(rejected_ms, 50), rejected_p99_ms=percentile(rejected_ms, 99))


async def run_load_async(server: str, clients: list[int], endpoint: str = "recommend", requests: int = 400,
                         duration_s: float = 30.0, candidates: int = 100, k: int = 10, seed: int = 0,
                         timeout_s: float = 60.0, protocol: str = "rest", grpc_target: str | None = None,
                         triton_url: str | None = None, triton_model: str = "ensemble_model") -> list[LevelResult]:
    """Run every concurrency level in turn against a loopback server; returns one result per level.

    The load goes over `protocol` (protocols.py); users, items and KV-cache counters always come from
    `server`'s REST API."""
    base = loopback_url(server)
    if endpoint not in ENDPOINTS:
        raise ValueError(f"--endpoint must be one of {', '.join(ENDPOINTS)}, got {endpoint!r}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if not 1 <= requests <= MAX_REQUESTS:
        raise ValueError(f"--requests must be between 1 and {MAX_REQUESTS}, got {requests}")
    if not 0 < duration_s <= MAX_DURATION_S:
        raise ValueError(f"--duration must be in (0, {MAX_DURATION_S:g}] seconds, got {duration_s}")
    if candidates < 1:
        raise ValueError(f"--candidates must be >= 1, got {candidates}")
    levels = parse_clients(clients)
    width = max(levels)
    limits = httpx.Limits(max_connections=width, max_keepalive_connections=width)
    # trust_env=False: no proxy from the environment may carry the load elsewhere; redirects are not followed
    async with httpx.AsyncClient(base_url=base, timeout=timeout_s, limits=limits, trust_env=False,
                                 follow_redirects=False) as client:
        workload = await prepare(client, endpoint, candidates, k, seed)
        async with connect(protocol, client, workload, timeout_s, width, grpc_target, triton_url,
                           triton_model) as send:
            return [await run_level(client, workload, n, requests, duration_s, send) for n in levels]


@contextlib.asynccontextmanager
async def connect(protocol: str, client: httpx.AsyncClient, workload: Workload, timeout_s: float, width: int,
                  grpc_target: str | None, triton_url: str | None, triton_model: str):
    """The sender of `protocol` (its channel or client open while the context lasts)."""
    from grinfer.bench import protocols as p

    if protocol in p.GRPC_PROTOCOLS:
        import grpc

        async with grpc.aio.insecure_channel(p.grpc_target(grpc_target, protocol, loopback_url)) as channel:
            make = p.grpc_sender if protocol == "grpc" else p.kserve_grpc_sender
            yield make(channel, workload.endpoint, timeout_s)
    elif protocol == "triton":
        if workload.endpoint != "rank":
            raise ValueError("--protocol triton ranks given candidates: use --endpoint rank")
        if not triton_url:
            raise ValueError("--protocol triton needs --triton-url, the v2 server's HTTP URL")
        limits = httpx.Limits(max_connections=width, max_keepalive_connections=width)
        tensors = p.triton_inputs(await p.triton_contexts(client, workload.users))
        async with httpx.AsyncClient(base_url=loopback_url(triton_url), timeout=timeout_s, limits=limits,
                                     trust_env=False, follow_redirects=False) as triton:
            yield p.kserve_http_sender(triton, workload.endpoint, triton_model, tensors)
    else:
        yield p.rest_sender(client, workload.endpoint) if protocol == "rest" else \
            p.kserve_http_sender(client, workload.endpoint)


def run_load(server: str, clients: list[int], **kwargs) -> list[LevelResult]:
    """Synchronous `run_load_async` (see there for the arguments)."""
    return asyncio.run(run_load_async(server, clients, **kwargs))


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_table(results: list[LevelResult]) -> str:
    head = (f"{'clients':>7} {'requests':>8} {'ok':>6} {'429':>5} {'errors':>14} {'p50 ms':>8} {'p90 ms':>8} "
            f"{'p99 ms':>8} {'ok/s':>7} {'req/s':>7} {'kv hit':>7} {'kv hit/partial/miss':>20}")
    lines = [head]
    for r in results:
        errors = ",".join(f"{k}:{v}" for k, v in sorted(r.errors.items())) or "0"
        hit = "-" if r.kv_hit_ratio is None else f"{r.kv_hit_ratio:.3f}"
        counts = "-" if r.kv_delta is None else "/".join(f"{r.kv_delta[k]:.0f}" for k in KV_GAUGES)
        lines.append(f"{r.clients:>7} {r.requests:>8} {r.ok:>6} {r.rejected_429:>5} {errors:>14} "
                     f"{_ms(r.p50_ms):>8} {_ms(r.p90_ms):>8} {_ms(r.p99_ms):>8} {r.ok_per_s:>7.1f} "
                     f"{r.requests_per_s:>7.1f} {hit:>7} {counts:>20}")
    return "\n".join(lines)


def write_report(results: list[LevelResult], out: Path, settings: dict) -> list[Path]:
    """`out`: settings and per-level results (without the raw latency lists) as JSON; beside it, the same
    name with .png: throughput and latency per concurrency level. Returns both paths."""
    levels = [{k: v for k, v in asdict(r).items() if k != "latencies_ms"} for r in results]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": settings, "levels": levels}, indent=2) + "\n")
    png = out.with_suffix(".png")
    plot(results, png, f"{settings['endpoint']} on {settings['server']}")
    return [out, png]


def plot(results: list[LevelResult], path: Path, title: str) -> None:
    """OK answers per second, and p50 / p90 / p99 latency, against the number of concurrent clients."""
    clients = [r.clients for r in results]
    with panels(path, 2, (10, 4)) as (rate, latency):
        rate.plot(clients, [r.ok_per_s for r in results], "o-", color="tab:blue")
        rate.set_ylabel("OK answers / s")
        for name, style in (("p50_ms", "o-"), ("p90_ms", "s--"), ("p99_ms", "^:")):
            values = [getattr(r, name) for r in results]
            latency.plot(clients, [float("nan") if v is None else v for v in values], style, label=name[:3])
        latency.set_ylabel("latency of OK answers (ms)")
        latency.legend(fontsize=8)
        for ax in (rate, latency):
            ax.set_xlabel("concurrent clients")
            ax.set_xscale("log", base=2)
            ax.set_xticks(clients, [str(c) for c in clients])
            ax.set_title(title, fontsize=9)
