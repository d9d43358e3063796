"""Serving sweep (`python -m grinfer.bench.serve_sweep`; on a GPU machine `scripts/gpu_serve.sh`).

For each backend it starts the real server (`grinfer serve`) on the chosen device, waits for /readyz,
sends one request per endpoint (its latency is the "first request" cost), then runs the closed-loop load
of `grinfer.bench.load` at each client count on each endpoint for a fixed time, sampling GPU utilisation
and memory through NVML meanwhile, and stops the server with SIGTERM. It prints one table and writes
`serve_sweep.json`, `serve_sweep.png`, each server's log and its /metrics page before and after the load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from grinfer.bench.figure import panels
from grinfer.bench.load import (
    ENDPOINTS,
    MAX_DURATION_S,
    MAX_REQUESTS,
    LevelResult,
    parse_clients,
    prepare,
    run_level,
    run_level_spread,
)
from grinfer.bench.nvml import GpuSampler, nvml_index
from grinfer.bench.served import ServedProcess, ServerFailed
from grinfer.bench.stack_profile import StackRecorder, summarize

BACKENDS = ("auto", "eager", "compiled", "fused")
START_ESTIMATE_S = 30  # a server start with trained models: load, engine warm-up, store open
REQUEST_TIMEOUT_S = 120.0  # a first request may pay compiles and graph captures


@dataclass(frozen=True)
class Sweep:
    """What to run: backends × endpoints × client counts, each level for `duration_s`."""

    backends: list[str]
    clients: list[int]
    endpoints: list[str]
    duration_s: float
    device: str
    out: Path
    model: str | None = None
    candidates: int = 100
    k: int = 10
    load_processes: int = 1  # client processes the closed loops are spread over
    ready_timeout_s: float = 900.0
    sample_interval_s: float = 0.1
    profile_clients: int | None = None  # py-spy the server during the levels of this client count

    @property
    def levels(self) -> int:
        return len(self.backends) * len(self.endpoints) * len(self.clients)

    def estimate_s(self) -> float:
        """Seconds of load plus server starts (not counting demo-model training on a first start)."""
        return self.levels * (self.duration_s + 1.0) + len(self.backends) * START_ESTIMATE_S


def metric_samples(text: str) -> dict[str, float]:
    """Every sample of a Prometheus text page: 'name{labels}' -> value (comments skipped)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            try:
                out[key] = float(value)
            except ValueError:
                continue
    return out


def counter_deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Growth of the counters and histogram sums/counts of grinfer_* between two pages (non-zero only)."""
    out = {}
    for key, value in after.items():
        name = key.partition("{")[0]
        if name.startswith("grinfer_") and name.endswith(("_total", "_sum", "_count")):
            delta = value - before.get(key, 0.0)
            if delta:
                out[key] = delta
    return out


def mean_batch(deltas: dict[str, float]) -> float | None:
    """Mean requests per engine step over a level, from grinfer_batch_requests' sum and count."""
    total = sum(v for k, v in deltas.items() if k.startswith("grinfer_batch_requests_sum"))
    steps = sum(v for k, v in deltas.items() if k.startswith("grinfer_batch_requests_count"))
    return total / steps if steps else None


def cpu_times() -> tuple[float, float] | None:
    """(busy, total) jiffies of every core of this host so far, from /proc/stat (None where it is absent)."""
    try:
        fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def cpu_busy_pct(before: tuple[float, float] | None, after: tuple[float, float] | None) -> float | None:
    """The host's CPU utilisation (all cores, server and load generator alike) between two cpu_times()."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return 100.0 * (after[0] - before[0]) / (after[1] - before[1])


def level_row(backend: str, endpoint: str, result: LevelResult, gpu, deltas: dict[str, float],
              cpu_pct: float | None = None) -> dict:
    """One table / JSON row: a level's counts, rate, latency, GPU and host CPU statistics, /metrics growth."""
    errors = dict(result.errors)
    if result.rejected_429:
        errors["429"] = result.rejected_429
    return {"backend": backend, "endpoint": endpoint, "clients": result.clients, "requests": result.requests,
            "ok": result.ok, "errors": errors, "seconds": result.seconds, "ok_per_s": result.ok_per_s,
            "requests_per_s": result.requests_per_s, "p50_ms": result.p50_ms, "p90_ms": result.p90_ms,
            "p99_ms": result.p99_ms, "candidates": result.candidates, "mean_batch": mean_batch(deltas),
            "host_cpu_pct": cpu_pct,
            "gpu": None if gpu is None else asdict(gpu), "metrics_delta": deltas}


async def _metrics(client: httpx.AsyncClient) -> str:
    r = await client.get("/metrics")
    r.raise_for_status()
    return r.text


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def load_backend(sweep: Sweep, backend: str, server: ServedProcess, sampler: GpuSampler,
                       done: list[int]) -> dict:
    """Every endpoint × client level against one ready server; the backend's part of the report."""
    url = server.url
    limits = httpx.Limits(max_connections=max(sweep.clients), max_keepalive_connections=max(sweep.clients))
    first_ms: dict[str, float | None] = {}
    rows: list[dict] = []
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S, limits=limits, trust_env=False,
                                 follow_redirects=False) as client:
        pages = {"before": await _metrics(client)}
        for endpoint in sweep.endpoints:
            workload = await prepare(client, endpoint, sweep.candidates, sweep.k, seed=0)
            first = await run_level(client, workload, 1, 1, REQUEST_TIMEOUT_S)
            first_ms[endpoint] = first.p50_ms
            for clients in sweep.clients:
                done[0] += 1
                _progress(f"[{done[0]}/{sweep.levels}] {backend} /v1/{endpoint} {clients} clients, "
                          f"{sweep.duration_s:g} s ...")
                before = metric_samples(await _metrics(client))
                profile = sweep.out / f"profile-{backend}-{endpoint}-{clients}.txt"
                recorder = StackRecorder(server.proc.pid, sweep.duration_s, profile.with_suffix(".raw")) \
                    if clients == sweep.profile_clients else None
                cpu_before = cpu_times()
                with sampler:
                    if sweep.load_processes > 1:
                        result = await asyncio.to_thread(run_level_spread, url, workload, clients, MAX_REQUESTS,
                                                         sweep.duration_s, sweep.load_processes, REQUEST_TIMEOUT_S)
                    else:
                        result = await run_level(client, workload, clients, MAX_REQUESTS, sweep.duration_s)
                deltas = counter_deltas(before, metric_samples(await _metrics(client)))
                if recorder is not None:
                    failed = await asyncio.to_thread(recorder.finish)
                    profile.write_text(failed or summarize(recorder.path))
                    _progress(f"    profile: {failed or profile}")
                rows.append(level_row(backend, endpoint, result, sampler.stats(), deltas,
                                      cpu_busy_pct(cpu_before, cpu_times())))
                _progress("    " + format_row(rows[-1]))
        pages["after"] = await _metrics(client)
    for name, text in pages.items():
        (sweep.out / f"metrics-{backend}-{name}.txt").write_text(text)
    return {"first_request_ms": first_ms, "rows": rows}


def run_backend(sweep: Sweep, backend: str, store_url: str, sampler: GpuSampler, done: list[int]) -> dict:
    """Start the server with `backend`, load it, stop it; a server that fails is reported, not raised."""
    args = ["--device", sweep.device, "--backend", backend, "--store", store_url]
    if sweep.model:
        args += ["--model", sweep.model]
    log = sweep.out / f"server-{backend}.log"
    _progress(f"starting the server: --backend {backend} --device {sweep.device} (log: {log})")
    server = ServedProcess(args, log)
    report: dict = {"backend": backend, "log": str(log), "error": None, "first_request_ms": {}, "rows": []}
    try:
        report["ready_s"] = server.wait_ready(sweep.ready_timeout_s)
        _progress(f"ready after {report['ready_s']:.1f} s")
        report.update(asyncio.run(load_backend(sweep, backend, server, sampler, done)))
    except (ServerFailed, httpx.HTTPError, ValueError) as exc:
        report["error"] = f"{type(exc).__name__}: {exc}"
        _progress(f"{backend}: {report['error']}")
        done[0] += len(sweep.endpoints) * len(sweep.clients) - len(report["rows"])
    finally:
        report["exit_code"] = server.stop()
    return report


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _ended(code: int) -> str:
    """How the server process ended: uvicorn re-raises SIGTERM after a clean shutdown (-15)."""
    if code < 0:
        name = signal.Signals(-code).name
        return "stopped by SIGTERM" if name == "SIGTERM" else f"ended by {name}"
    return f"exit code {code}"


def format_row(row: dict) -> str:
    errors = ",".join(f"{k}:{v}" for k, v in sorted(row["errors"].items())) or "0"
    gpu = row["gpu"]
    util = "n/a" if gpu is None else f"{gpu['util_median']:.0f}/{gpu['util_max']:.0f}"
    mem = "n/a" if gpu is None else f"{gpu['mem_used_max_mib']:.0f}"
    batch = "-" if row["mean_batch"] is None else f"{row['mean_batch']:.1f}"
    cpu = "-" if row.get("host_cpu_pct") is None else f"{row['host_cpu_pct']:.0f}"
    return (f"{row['backend']:>8} {row['endpoint']:>9} {row['clients']:>7} {row['ok']:>7} {errors:>16} "
            f"{row['ok_per_s']:>8.1f} {_ms(row['p50_ms']):>8} {_ms(row['p99_ms']):>8} {util:>9} {mem:>8} "
            f"{batch:>6} {cpu:>5}")


def format_table(backends: list[dict]) -> str:
    """The sweep as a text table, then one line per backend (ready time, first requests, errors)."""
    head = (f"{'backend':>8} {'endpoint':>9} {'clients':>7} {'ok':>7} {'errors':>16} {'ok/s':>8} "
            f"{'p50 ms':>8} {'p99 ms':>8} {'gpu% m/x':>9} {'mem MiB':>8} {'batch':>6} {'cpu%':>5}")
    lines = [head] + [format_row(row) for b in backends for row in b["rows"]]
    for b in backends:
        first = ", ".join(f"/v1/{e} {_ms(ms)} ms" for e, ms in b["first_request_ms"].items()) or "-"
        ready = f"{b['ready_s']:.1f} s" if "ready_s" in b else "never"
        lines.append(f"{b['backend']}: ready after {ready}; first request {first}; {_ended(b['exit_code'])}"
                     + (f"; FAILED: {b['error'].splitlines()[0]}" if b["error"] else ""))
    return "\n".join(lines)


def plot(backends: list[dict], path: Path) -> None:
    """OK answers / s, p99 latency (and GPU utilisation when sampled) against clients, a line per backend × endpoint."""
    rows = [row for b in backends for row in b["rows"]]
    with_gpu = any(row["gpu"] for row in rows)
    with panels(path, 3 if with_gpu else 2, (15 if with_gpu else 10, 4)) as axes:
        colours = {b["backend"]: f"C{i}" for i, b in enumerate(backends)}
        series = {(row["backend"], row["endpoint"]) for row in rows}
        for backend, endpoint in sorted(series):
            mine = [row for row in rows if (row["backend"], row["endpoint"]) == (backend, endpoint)]
            clients = [row["clients"] for row in mine]
            label = f"{backend} /v1/{endpoint}"
            fmt = "o-" if endpoint == "rank" else "s--"
            style = {"color": colours[backend], "label": label}
            axes[0].plot(clients, [row["ok_per_s"] for row in mine], fmt, **style)
            axes[1].plot(clients, [float("nan") if row["p99_ms"] is None else row["p99_ms"] for row in mine],
                         fmt, **style)
            if with_gpu:
                axes[2].plot(clients, [row["gpu"]["util_median"] if row["gpu"] else float("nan") for row in mine],
                             fmt, **style)
        for ax, ylabel in zip(axes, ("OK answers / s", "p99 latency of OK answers (ms)", "GPU utilisation, median %")):
            ax.set_xlabel("concurrent clients")
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({row["clients"] for row in rows}))
            ax.xaxis.set_major_formatter("{x:g}")
            ax.set_ylabel(ylabel)
        axes[1].set_yscale("log")
        if rows:
            axes[0].legend(fontsize=7)


def run_sweep(sweep: Sweep) -> dict:
    """Run every backend in turn (one SQLite store, filled on the first start, shared by all); the report."""
    sweep.out.mkdir(parents=True, exist_ok=True)
    sampler = GpuSampler(nvml_index(sweep.device), sweep.sample_interval_s)
    _progress(f"{sweep.levels} levels of {sweep.duration_s:g} s on {sweep.device}: about "
              f"{sweep.estimate_s() / 60:.1f} min, plus demo-model training if the server has to train them; "
              f"GPU sampling: {sampler.gpu_name or sampler.unavailable_reason}")
    done = [0]
    try:
        with tempfile.TemporaryDirectory(prefix="grinfer-sweep-") as tmp:
            store_url = f"sqlite:///{Path(tmp) / 'store.db'}"
            backends = [run_backend(sweep, b, store_url, sampler, done) for b in sweep.backends]
    finally:
        sampler.close()
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(sweep).items()}
    report = {"settings": settings, "gpu": sampler.gpu_name, "backends": backends}
    (sweep.out / "serve_sweep.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(backends, sweep.out / "serve_sweep.png")
    return report


def _names(text: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise ValueError(f"{flag}: expected a comma-separated list of {', '.join(allowed)}, got {text!r}")
    return names


def parse_sweep(argv: list[str] | None = None) -> Sweep:
    """The command line as a Sweep; argparse's exit code 2 with one message line on a bad value."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--backends", default="eager,compiled,fused",
                        help="comma-separated, of auto, eager, compiled, fused [eager,compiled,fused]")
    parser.add_argument("--clients", default="1,8,32,64", help="client counts, comma-separated [1,8,32,64]")
    parser.add_argument("--endpoints", default="rank,recommend", help="comma-separated [rank,recommend]")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per level [10]")
    parser.add_argument("--candidates", type=int, default=100, help="candidates per /v1/rank request [100]")
    parser.add_argument("--device", default="cuda", help="the server's device: cuda, cuda:N or cpu [cuda]")
    parser.add_argument("--model", help="checkpoint dir to serve [the demo models, trained on first start]")
    parser.add_argument("--ready-timeout", type=float, default=900.0,
                        help="seconds to wait for /readyz per server start [900]")
    parser.add_argument("--load-processes", type=int, default=1,
                        help="client processes the load is spread over (one saturates near a few hundred req/s) [1]")
    parser.add_argument("--profile-clients", type=int,
                        help="sample the server's Python stacks with py-spy (if installed) during the levels of "
                             "this client count; writes profile-*.txt beside the report")
    parser.add_argument("--out", type=Path, default=Path("runs/serve_sweep"), help="output dir [runs/serve_sweep]")
    args = parser.parse_args(argv)
    try:
        if not 0 < args.duration <= MAX_DURATION_S:
            raise ValueError(f"--duration must be in (0, {MAX_DURATION_S:g}] seconds, got {args.duration:g}")
        if args.candidates < 1:
            raise ValueError(f"--candidates must be >= 1, got {args.candidates}")
        if not 1 <= args.load_processes <= 64:
            raise ValueError(f"--load-processes must be between 1 and 64, got {args.load_processes}")
        if args.ready_timeout <= 0:
            raise ValueError(f"--ready-timeout must be > 0, got {args.ready_timeout:g}")
        nvml_index(args.device)
        return Sweep(backends=_names(args.backends, BACKENDS, "--backends"), clients=parse_clients([args.clients]),
                     endpoints=_names(args.endpoints, ENDPOINTS, "--endpoints"), duration_s=args.duration,
                     device=args.device, out=args.out, model=args.model, candidates=args.candidates,
                     ready_timeout_s=args.ready_timeout, load_processes=args.load_processes,
                     profile_clients=args.profile_clients)
    except ValueError as exc:
        parser.error(str(exc))


def main(argv: list[str] | None = None) -> int:
    """Run the sweep; exit code 1 when a server failed to start or died, 0 otherwise (errors are data)."""
    report = run_sweep(parse_sweep(argv))
    print(format_table(report["backends"]), flush=True)
    print(f"wrote {report['settings']['out']}/serve_sweep.json and serve_sweep.png", flush=True)
    return 1 if any(b["error"] for b in report["backends"]) else 0


if __name__ == "__main__":
    sys.exit(main())
