"""`grinfer models ...`: the registry from the command line (register, list, promote, experiments, a per-arm
report of a running server). Every error is one line and exit status 2."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from grinfer.registry.records import Arm, RegistryError
from grinfer.registry.store import HashMismatch, Registry

models_app = typer.Typer(help="The model registry: versions, promotion, A/B experiments.", no_args_is_help=True)
StoreOpt = Annotated[str | None, typer.Option("--store", envvar="GRINFER_STORE",
                                              help="The metadata store holding the registry (sqlite:///PATH.db or "
                                                   "postgresql://...) [GRINFER_STORE].")]


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(2)


@contextmanager
def _registry(store: str | None, default: Callable[[], str] | None = None) -> Iterator[Registry]:
    """The registry at `store` (or `default()`), closed afterwards; registry errors become one-line exits."""
    from grinfer.registry import open_registry

    url = store or (default() if default is not None else None)
    if url is None:
        raise _fail("--store: which store holds the registry? (--store URL or GRINFER_STORE)")
    try:
        registry = open_registry(url)
    except (ValueError, RuntimeError) as exc:
        raise _fail(f"--store: cannot open it ({exc})") from None
    try:
        yield registry
    except (RegistryError, HashMismatch) as exc:
        raise _fail(str(exc)) from None
    finally:
        registry.close()


def _model_store(path: Path) -> str:
    """The store `grinfer serve --model PATH` would use: the one kept for the model's training dataset."""
    from grinfer.config import default_store_url, grinfer_home
    from grinfer.registry.content import CONFIG_FILE, checkpoint_parts

    try:
        meta = json.loads((checkpoint_parts(path)["ranking"] / CONFIG_FILE).read_text())
    except (ValueError, OSError) as exc:
        raise _fail(f"DIR: {exc}") from None
    spec = meta.get("training", {}).get("data") or str(path.resolve())
    return default_store_url(spec, grinfer_home())


@models_app.command()
def register(
    path: Annotated[Path, typer.Argument(help="The model directory (a checkpoint, or ranking/ + retrieval/).")],
    name: Annotated[str, typer.Option("--name", help="The model's name; versions are numbered per name.")],
    store: StoreOpt = None,
) -> None:
    """Record DIR as the next version of NAME (stage staging), with its content hash, configs and metrics."""
    with _registry(store, lambda: _model_store(path)) as registry:
        v = registry.register(path, name)
    typer.echo(f"registered {v.key} (stage {v.stage}, sha256 {v.content_hash[:12]}) from {v.path}")


@models_app.command("list")
def list_versions(
    name: Annotated[str | None, typer.Option("--name", help="Only this model.")] = None,
    store: StoreOpt = None,
) -> None:
    """Registered versions (key, stage, registered, hash, path) and experiments."""
    with _registry(store) as registry:
        versions, experiments = registry.versions(name), registry.experiments(name)
    typer.echo(f"{'version':<24} {'stage':<10} {'registered':<19} {'sha256':<12}  path")
    for v in versions:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(v.created_at))
        typer.echo(f"{v.key:<24} {v.stage:<10} {when:<19} {v.content_hash[:12]:<12}  {v.path}")
    now = time.time()
    for e in experiments:
        arms = ", ".join(f"{a.name}={a.weight:g}@{a.version or 'production'}" for a in e.arms)
        shadow = f"; shadow {e.shadow_version} on {e.shadow_fraction:.1%}" if e.shadow_version is not None else ""
        typer.echo(f"experiment {e.name} on {e.model} ({'running' if e.active(now) else 'stopped'}): {arms}{shadow}")


@models_app.command()
def promote(
    name: Annotated[str, typer.Argument(help="The model's name.")],
    version: Annotated[int, typer.Argument(help="The version to make production.")],
    store: StoreOpt = None,
) -> None:
    """Make VERSION the production version of NAME (the old one archived); servers in registry mode swap to it
    at their next registry poll (or at once through POST /v1/admin/models/promote)."""
    with _registry(store) as registry:
        v = registry.promote(name, version)
    typer.echo(f"{v.key} is production")


def parse_arm(spec: str) -> Arm:
    """NAME=WEIGHT (the production version) or NAME=WEIGHT@VERSION -> Arm; RegistryError naming --arm."""
    arm, _, rest = spec.partition("=")
    weight, _, version = rest.partition("@")
    try:
        return Arm(arm, float(weight), int(version) if version else None)
    except ValueError:
        raise RegistryError("--arm", f"expected NAME=WEIGHT or NAME=WEIGHT@VERSION, got {spec!r}") from None


@models_app.command()
def experiment(
    name: Annotated[str, typer.Argument(help="The experiment's name (assignment hashes it with the user).")],
    model: Annotated[str, typer.Option("--model", help="The registered model it tests.")],
    arms: Annotated[list[str], typer.Option("--arm", help="NAME=WEIGHT (serves production) or NAME=WEIGHT@VERSION; "
                                                          "repeat per arm.")],
    shadow: Annotated[int | None, typer.Option(help="A version scoring sampled traffic in the background.")] = None,
    shadow_fraction: Annotated[float, typer.Option(help="The share of requests the shadow scores.")] = 0.05,
    store: StoreOpt = None,
) -> None:
    """Start an A/B experiment on MODEL now."""
    with _registry(store) as registry:
        e = registry.start_experiment(name, model, [parse_arm(a) for a in arms], shadow,
                                      shadow_fraction if shadow is not None else 0.0)
    typer.echo(f"experiment {e.name} running on {e.model}: " + ", ".join(f"{a.name} {a.weight:g}" for a in e.arms))


@models_app.command()
def stop(
    name: Annotated[str, typer.Argument(help="The experiment to stop.")],
    store: StoreOpt = None,
) -> None:
    """Stop an experiment: its model's traffic goes back to the production version alone."""
    with _registry(store) as registry:
        registry.stop_experiment(name)
    typer.echo(f"experiment {name} stopped")


@models_app.command()
def report(
    server: Annotated[str, typer.Option("--server", help="A running server's loopback URL.")]
    = "http://127.0.0.1:8000",
) -> None:
    """Per-arm requests, errors and engine latency of a running server (GET /v1/admin/arms)."""
    import httpx

    from grinfer.bench.load import loopback_url

    try:
        body = httpx.get(f"{loopback_url(server)}/v1/admin/arms", timeout=10, trust_env=False).raise_for_status().json()
    except (ValueError, httpx.HTTPError) as exc:
        raise _fail(f"--server: {exc}") from None
    typer.echo(format_arms(body["arms"]))


def format_arms(arms: list[dict]) -> str:
    """The per-arm table: requests, errors, mean engine ms, p50 and p99 bucket edges."""
    lines = [f"{'arm':<16} {'model version':<24} {'requests':>9} {'errors':>7} {'mean ms':>8} {'p50 ≤ ms':>9} "
             f"{'p99 ≤ ms':>9}"]
    for a in arms:
        mean = 1e3 * a["seconds_sum"] / a["requests"] if a["requests"] else None
        cells = [f"{1e3 * v:.1f}" if v is not None else "-" for v in (mean, a["p50_s"], a["p99_s"])]
        lines.append(f"{a['arm']:<16} {a['model_version']:<24} {a['requests']:>9} {a['errors']:>7} {cells[0]:>8} "
                     f"{cells[1]:>9} {cells[2]:>9}")
    return "\n".join(lines)
