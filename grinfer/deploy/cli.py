"""`grinfer deploy nginx|haproxy|envoy|k8s`: write a balancer configuration for N replicas, or Kubernetes
manifests."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from grinfer.deploy import envoy, haproxy, nginx
from grinfer.deploy.plan import POLICIES, make_plan

RENDERERS = {"nginx": nginx.render, "haproxy": haproxy.render, "envoy": envoy.render}
DEFAULT_LISTEN = {"nginx": "0.0.0.0:8080", "haproxy": "0.0.0.0:8080", "envoy": "0.0.0.0:8080"}

deploy_app = typer.Typer(help="Balancer configurations for a fleet of replicas (consistent hash on X-User-Id).",
                         no_args_is_help=True, rich_markup_mode=None)


def _emit(text: str, out: Path | None) -> None:
    """The text on standard output, or written to `out` (parents created)."""
    if out is None:
        typer.echo(text, nl=False)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    typer.echo(f"wrote {out}", err=True)


def _command(balancer: str):
    def write(
        replicas: Annotated[str, typer.Option(help="The replicas' REST addresses, HOST:PORT,HOST:PORT,...")],
        listen: Annotated[str, typer.Option(help="Where the balancer takes REST traffic.")] = DEFAULT_LISTEN[balancer],
        grpc_replicas: Annotated[str | None, typer.Option(help="The same replicas' gRPC addresses, in the same "
                                                               "order (HTTP/2 upstreams).")] = None,
        grpc_listen: Annotated[str | None, typer.Option(help="Where the balancer takes gRPC traffic.")] = None,
        policy: Annotated[str, typer.Option(help=f"{' or '.join(POLICIES)} (round-robin: only to measure what "
                                                 "affinity is worth).")] = "hash",
        admin: Annotated[str | None, typer.Option(help="HOST:PORT of the balancer's stats/admin page (Envoy admin, "
                                                       "HAProxy stats; nginx has none).")] = None,
        out: Annotated[Path | None, typer.Option(help="Write here instead of standard output.")] = None,
    ) -> None:
        try:
            text = RENDERERS[balancer](make_plan(replicas, listen, grpc_replicas, grpc_listen, policy, admin))
        except ValueError as exc:
            typer.echo(f"error: {exc}", err=True)
            sys.exit(2)
        _emit(text, out)

    write.__doc__ = f"Write a {balancer} configuration hashing X-User-Id over the replicas."
    return write


for _name in RENDERERS:
    deploy_app.command(_name)(_command(_name))


@deploy_app.command("k8s")
def k8s_manifests(
    variant: Annotated[str, typer.Option(help="cpu, or gpu (the CUDA image, nvidia.com/gpu: 1 per replica).")] = "cpu",
    count: Annotated[int, typer.Option(help="Replicas in the StatefulSet.")] = 3,
    image: Annotated[str, typer.Option(help="The grinfer image (deploy/Dockerfile or deploy/Dockerfile.cuda).")]
    = "grinfer:latest",
    cache: Annotated[str, typer.Option(help="The replicas' shared Redis (GRINFER_CACHE).")] = "redis://redis:6379/0",
    host: Annotated[str, typer.Option(help="The Ingresses' host name.")] = "grinfer.example.com",
    service_monitor: Annotated[bool, typer.Option(help="Add a Prometheus Operator ServiceMonitor.")] = False,
    out: Annotated[Path | None, typer.Option(help="Write here instead of standard output.")] = None,
) -> None:
    """Write Kubernetes manifests: StatefulSet, Services, ingress-nginx hashing X-User-Id, PodDisruptionBudget."""
    try:
        from grinfer.deploy.k8s import Cluster, render
    except ImportError as exc:
        typer.echo(f"error: {exc.name} is missing: pip install 'grinfer[deploy]'", err=True)
        sys.exit(2)
    try:
        text = render(Cluster(variant, count, image, cache, host, service_monitor))
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    _emit(text, out)


@deploy_app.command("bench")
def bench(
    direct: Annotated[str, typer.Option(help="One replica's URL (loopback), e.g. http://127.0.0.1:8001.")],
    via: Annotated[list[str], typer.Option(metavar="NAME=URL", help="A balancer in front of the fleet "
                                                                    "(repeatable), e.g. nginx=http://127.0.0.1:8080.")]
    = [],  # noqa: B006
    users: Annotated[int, typer.Option(help="Users in the replayed trace.")] = 40,
    repeats: Annotated[int, typer.Option(help="Requests per user in the trace.")] = 5,
    clients: Annotated[int, typer.Option(help="Concurrent closed loops.")] = 4,
    rounds: Annotated[int, typer.Option(help="Turns the targets take (each a share of the users).")] = 4,
    seed: int = 0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results as JSON here.")] = None,
) -> None:
    """Latency each balancer adds over a direct replica (p50/p99) and the fleet's KV hit ratio on one trace."""
    import httpx

    from grinfer.deploy.bench import format_table, run_bench, write_json

    targets = {}
    for spec in via:
        name, sep, url = spec.partition("=")
        if not sep or not name or not url:
            typer.echo(f"error: --via: expected NAME=URL, got {spec!r}", err=True)
            sys.exit(2)
        targets[name] = url
    try:
        results = run_bench(direct, targets, users, repeats, clients, seed, rounds)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except httpx.HTTPError as exc:
        typer.echo(f"error: --direct/--via: {exc}", err=True)
        sys.exit(2)
    typer.echo(format_table(results))
    if json_out is not None:
        write_json(results, json_out, {"users": users, "repeats": repeats, "clients": clients, "rounds": rounds,
                                        "seed": seed})
        typer.echo(f"wrote {json_out}")
