"""The `grinfer` command: wiring only; the work lives in grinfer.train, grinfer.recommend and friends."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="grinfer: serve, train and evaluate generative recommenders (MTGR / HSTU).",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

DataOpt = Annotated[str, typer.Option("--data", help="'synthetic', 'synthetic:users=N,items=N,events=N,seed=N' "
                                                      "or a MovieLens-1M directory.")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")]


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(2)


def _overrides(pairs: list[str]) -> dict:
    """--set key=value pairs -> a dict of JSON-parsed values (bare words stay strings)."""
    out = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq:
            raise _fail(f"--set expects key=value, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


@app.command()
def train(
    out: Annotated[Path, typer.Option(help="Checkpoint directory to write.")],
    data: DataOpt = "synthetic",
    task: Annotated[str, typer.Option(help="ranking (MTGR), retrieval (causal HSTU) or both.")] = "ranking",
    preset_name: Annotated[str, typer.Option("--preset", help="Ranking preset (mtgr-tiny/small/medium/large), "
                                                               "or the retrieval preset for --task retrieval.")] = "",
    retrieval_preset: Annotated[str, typer.Option(help="Retrieval preset for --task both.")] = "hstu-ml1m",
    set_: Annotated[list[str], typer.Option("--set", help="Override a config field, e.g. --set mask=causal "
                                                          "--set group_ln=false (repeatable).")] = [],  # noqa: B006
    epochs: int = 10, batch_size: int = 128, lr: float = 1e-3, weight_decay: float = 0.0,
    negatives: Annotated[int, typer.Option(help="Sampled-softmax negatives (retrieval).")] = 128,
    seed: int = 0, device: DeviceOpt = "auto",
    validate: Annotated[bool, typer.Option(help="Evaluate after every epoch (for the curves).")] = True,
) -> None:
    """Train a model (or both) on a dataset; writes checkpoint, metrics.json and loss.png."""
    from pydantic import ValidationError

    from grinfer.config import preset
    from grinfer.data import load_dataset
    from grinfer.train.loop import TrainSettings, resolve_device
    from grinfer.train.run import RANKING_DIR, RETRIEVAL_DIR, train_model

    if task not in ("ranking", "retrieval", "both"):
        raise _fail(f"--task must be ranking, retrieval or both, got {task!r}")
    jobs = {"ranking": [(preset_name or "mtgr-small", out)],
            "retrieval": [(preset_name or "hstu-ml1m", out)],
            "both": [(retrieval_preset, out / RETRIEVAL_DIR), (preset_name or "mtgr-small", out / RANKING_DIR)]}[task]
    try:
        configs = [(preset(name).replace(**_overrides(set_)), path) for name, path in jobs]
        ds = load_dataset(data)
    except (ValueError, ValidationError, FileNotFoundError) as exc:
        raise _fail(str(exc)) from None
    settings = TrainSettings(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                             num_negatives=negatives, seed=seed, device=resolve_device(device))
    typer.echo(f"dataset {ds.name}: {len(ds.users)} users, {ds.catalog.num_items} items, {ds.num_events} events; "
               f"device {settings.device}")
    for cfg, path in configs:
        record = train_model(cfg, ds, data, settings, path, validate=validate)
        typer.echo(f"{cfg.name}: wrote {path} in {record['train_seconds']} s")
        _print_metrics({k: record[k] for k in ("retrieval", "ranking") if k in record})


@app.command("eval")
def evaluate(
    model: Annotated[Path, typer.Option(help="Checkpoint directory (or a --task both output).")],
    data: DataOpt = "synthetic",
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the metrics here.")] = None,
    device: DeviceOpt = "auto",
) -> None:
    """Retrieval HR/NDCG@10/50/200 and per-task ranking AUC/GAUC under DESIGN §5's protocol."""
    from grinfer import load
    from grinfer.data import load_dataset
    from grinfer.train.loop import resolve_device
    from grinfer.train.run import checkpoint_dirs
    from grinfer.train.run import evaluate as evaluate_model

    try:
        dirs = checkpoint_dirs(model)
        ds = load_dataset(data)
    except (ValueError, FileNotFoundError) as exc:
        raise _fail(str(exc)) from None
    dev = resolve_device(device)
    result: dict = {}
    for d in dirs:
        result.update(evaluate_model(load(d, map_location=dev), ds, dev))
    _print_metrics(result)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2) + "\n")
        typer.echo(f"wrote {json_out}")


def _print_metrics(result: dict) -> None:
    if "retrieval" in result:
        r = result["retrieval"]
        typer.echo(f"\nretrieval ({r['users']} users, full ranking, history excluded)")
        typer.echo("  " + "  ".join(f"{k:>10}" for k in r if k != "users"))
        typer.echo("  " + "  ".join(f"{v:>10.4f}" for k, v in r.items() if k != "users"))
    if "ranking" in result:
        r = result["ranking"]
        typer.echo(f"\nranking ({r['candidates']} candidates, last 10% of each user's events)")
        typer.echo(f"  {'task':<8}{'AUC':>10}{'GAUC':>10}")
        for task, m in r.items():
            if isinstance(m, dict):
                typer.echo(f"  {task:<8}{m['auc']:>10.4f}{m['gauc']:>10.4f}")


@app.command()
def bench(
    workloads: Annotated[str, typer.Option(help="Comma-separated: R1-cold, R1-warm, R2, CPU-demo.")] = "CPU-demo",
    backends: Annotated[str, typer.Option(help="Comma-separated backends to run side by side: eager, compiled, "
                                               "fused (CUDA).")] = "eager",
    batch: Annotated[list[int], typer.Option(help="Batch size(s) (repeatable); default: the workload's.")]
    = [],  # noqa: B006
    static: Annotated[int | None, typer.Option(help="Override S events per request.")] = None,
    realtime: Annotated[int | None, typer.Option(help="Override R events per request.")] = None,
    candidates: Annotated[int | None, typer.Option(help="Override candidates per request "
                                                        "(--server --endpoint rank: default 100).")] = None,
    preset_name: Annotated[str | None, typer.Option("--preset", help="Override the model preset.")] = None,
    iters: int = 10, warmup: int = 2, seed: int = 0, device: DeviceOpt = "auto",
    max_batch_tokens: Annotated[int | None, typer.Option(help="Engine token budget (default: a whole batch).")]
    = None,
    host_cache_gb: Annotated[float, typer.Option(help="Host-tier KV cache size in GB (0 = off).")] = 0.0,
    cuda_graphs: Annotated[bool, typer.Option(help="fused on CUDA: replay the layer stack from CUDA graphs.")]
    = True,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write results JSON (and a PNG beside it).")]
    = None,
    server: Annotated[str | None, typer.Option(help="Load-test a running server at this loopback URL instead "
                                                    "(closed loop over HTTP), e.g. http://127.0.0.1:8000.")]
    = None,
    clients: Annotated[list[str], typer.Option(help="--server: concurrent client loops per level, repeatable "
                                                    "or comma-separated, e.g. 1,8,32,64.")] = ["1,8"],  # noqa: B006
    endpoint: Annotated[str, typer.Option(help="--server: recommend or rank.")] = "recommend",
    requests: Annotated[int, typer.Option(help="--server: requests per level (at most).")] = 400,
    duration: Annotated[float, typer.Option(help="--server: seconds per level (at most).")] = 30.0,
) -> None:
    """Time workloads through the engine per backend: latency, throughput, TFLOP/s, memory, cache hits.

    With --server: closed-loop HTTP load against a running server on this machine instead.
    """
    if server is not None:
        import httpx

        from grinfer.bench.load import format_table, parse_clients, run_load, write_json

        try:
            levels = parse_clients(clients)
            results = run_load(server, levels, endpoint=endpoint, requests=requests, duration_s=duration,
                               candidates=100 if candidates is None else candidates, seed=seed)
        except ValueError as exc:
            raise _fail(str(exc)) from None
        except httpx.HTTPError as exc:
            raise _fail(f"--server {server}: {exc}") from None
        settings = {"server": server, "endpoint": endpoint, "clients": levels, "requests": requests,
                    "duration_s": duration, "candidates": results[0].candidates, "seed": seed}
        typer.echo(f"{endpoint} on {server}"
                   + (f", {results[0].candidates} candidates per request" if results[0].candidates else ""))
        typer.echo(format_table(results))
        if json_out:
            write_json(results, json_out, settings)
            typer.echo(f"wrote {json_out}")
        return
    from grinfer.bench.run import matmul_ceiling, run_workload, write_report
    from grinfer.bench.workloads import workload
    from grinfer.engine.backends import BACKENDS
    from grinfer.train.loop import resolve_device

    dev = resolve_device(device)
    names, kinds = [w for w in workloads.split(",") if w], [b for b in backends.split(",") if b]
    try:
        for kind in kinds:
            if kind not in BACKENDS:
                raise ValueError(f"--backends: unknown backend {kind!r}; choose from {', '.join(BACKENDS)}")
        shapes = [workload(n, static=static, realtime=realtime, candidates=candidates, preset=preset_name,
                           batch=b) for n in names for b in (batch or [None])]
    except ValueError as exc:
        raise _fail(str(exc)) from None
    import torch

    ceiling = matmul_ceiling(torch.device(dev), torch.bfloat16 if dev.startswith("cuda") else torch.float32)
    overrides = {"host_cache_bytes": int(host_cache_gb * 1e9), "cuda_graphs": cuda_graphs}
    if max_batch_tokens is not None:
        overrides["max_batch_tokens"] = max_batch_tokens
    rows = [run_workload(w, kind, dev, iters, warmup, seed, overrides) for w in shapes for kind in kinds]
    typer.echo(write_report(rows, ceiling, dev, json_out))


@app.command()
def serve(
    model: Annotated[str | None, typer.Option(help="Checkpoint dir (a --task both output or a ranking checkpoint); "
                                                   "default: the demo models, trained on first start.")] = None,
    store: Annotated[str | None, typer.Option(help="sqlite:///path.db (default) or postgresql://...")] = None,
    cache: Annotated[str | None, typer.Option(help="memory:// (default) or redis://host:port/db")] = None,
    host: Annotated[str | None, typer.Option(help="Bind address [127.0.0.1].")] = None,
    port: Annotated[int | None, typer.Option(help="REST port [8000].")] = None,
    grpc_port: Annotated[int | None, typer.Option(help="gRPC port, 0 = off [50051].")] = None,
    api_key: Annotated[str | None, typer.Option(help="Require this key (X-API-Key) on write/admin calls.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or auto [auto].")] = None,
    backend: Annotated[str | None, typer.Option(help="eager, compiled or fused (CUDA) [eager].")] = None,
    config: Annotated[str | None, typer.Option(help="A TOML file of these settings ([server] table).")] = None,
) -> None:
    """Serve REST (+ OpenAPI at /docs, web page at /, /metrics) and gRPC. Settings: flags > GRINFER_* env > file."""
    import logging

    from pydantic import ValidationError

    from grinfer.config import load_server_config
    from grinfer.serving.server import StartupError, run
    from grinfer.train.loop import resolve_device
    from grinfer.train.run import demo_models_ready, ensure_demo_models

    try:
        cfg = load_server_config(config, model=model, store=store, cache=cache, host=host, port=port,
                                 grpc_port=grpc_port, api_key=api_key, device=device, backend=backend)
    except (ValidationError, OSError, ValueError) as exc:
        raise _fail(f"configuration: {exc}") from None
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    dev = resolve_device(cfg.device)
    model_path = Path(cfg.model).expanduser() if cfg.model else None
    train = None
    if model_path is None:
        model_path = demo_model_dir()
        typer.echo(f"no --model: using the demo models in {model_path} (trained on first start)")
        if not demo_models_ready(model_path):
            demo = model_path

            def train(report):  # runs on the server's start-up thread, the port already answering
                ensure_demo_models(demo, dev, on_model=lambda i, n, name: report(f"training demo models ({name})",
                                                                                 i / n))
    try:
        run(cfg, model_path, dev, train)
    except StartupError as exc:
        raise _fail(str(exc)) from None


@app.command("import-movielens")
def import_movielens(
    path: Annotated[Path, typer.Argument(help="A MovieLens-1M directory (ratings.dat[.gz], users.dat, movies.dat).")],
    store: Annotated[str, typer.Option(help="Target store URL.")] = "sqlite:///~/.cache/grinfer/grinfer.db",
) -> None:
    """Load a MovieLens directory into a store (catalogue, profiles, events as static history)."""
    from grinfer.data import DataFormatError, read_movielens
    from grinfer.storage import open_store
    from grinfer.storage.importer import import_dataset

    try:
        ds = read_movielens(path)
        target = open_store(store)
    except (DataFormatError, FileNotFoundError, ValueError) as exc:
        raise _fail(str(exc)) from None
    try:
        counts = import_dataset(ds, target)
    finally:
        target.close()
    typer.echo(f"imported {counts} into {store}")


def demo_model_dir() -> Path:
    """Where the demo models are cached: $GRINFER_HOME (default ~/.cache/grinfer)/demo-VERSION-fN."""
    from grinfer import __version__
    from grinfer.features.featurizer import FEATURES_VERSION

    root = os.environ.get("GRINFER_HOME") or Path.home() / ".cache" / "grinfer"
    return Path(root) / f"demo-{__version__}-f{FEATURES_VERSION}"


@app.command()
def demo(
    model: Annotated[Path | None, typer.Option(help="A --task both checkpoint; default: train (and cache) one.")]
    = None,
    data: Annotated[str | None, typer.Option(help="Dataset spec; default: the one the model was trained on.")]
    = None,
    users: Annotated[int, typer.Option(help="How many users to show.")] = 3,
    k: Annotated[int, typer.Option(help="Recommendations per user.")] = 10,
    device: DeviceOpt = "auto",
    retrain: Annotated[bool, typer.Option(help="Ignore the cached demo model.")] = False,
) -> None:
    """Show a few users' recent history and their top-k recommendations with scores."""
    from grinfer import load
    from grinfer.data import load_dataset
    from grinfer.recommend import Recommender
    from grinfer.train.loop import resolve_device
    from grinfer.train.run import DEMO_DATA, RANKING_DIR, RETRIEVAL_DIR, ensure_demo_models, training_data_spec

    dev = resolve_device(device)
    if model is None:
        model = demo_model_dir()
        if retrain or not (model / RANKING_DIR / "config.json").is_file():
            typer.echo(f"training the demo models on {DEMO_DATA} (cached in {model}) ...")
        ensure_demo_models(model, dev, retrain)
    ranking_dir = model / RANKING_DIR if (model / RANKING_DIR).is_dir() else model
    retrieval_dir = model / RETRIEVAL_DIR
    try:
        ranker = load(ranking_dir, map_location=dev)
        retriever = load(retrieval_dir, map_location=dev) if retrieval_dir.is_dir() else None
        ds = load_dataset(data or training_data_spec(ranking_dir) or DEMO_DATA)
    except (ValueError, FileNotFoundError) as exc:
        raise _fail(str(exc)) from None
    show_recommendations(Recommender(ranker, ds.catalog, retriever, device=dev), ds, users, k)


def show_recommendations(rec, ds, users: int, k: int) -> None:
    """Print recent history and top-k recommendations for the first `users` users."""
    from grinfer.features import UserContext

    cat = ds.catalog
    genres = lambda item: "|".join(g for g, on in zip(cat.genre_names, cat.genres[item]) if on)
    for user in ds.users[:users]:
        ctx = UserContext.from_timeline(user, num_realtime=20)
        typer.secho(f"\nuser {user.user_id}: {len(user)} events; profile "
                    + ", ".join(f"{f}={v}" for f, v in zip(ds.profile_fields, user.profile)), bold=True)
        typer.echo("  recent history:")
        for item, rating in list(zip(user.items, user.ratings))[-5:]:
            typer.echo(f"    {'*' * int(rating):<5}  {cat.titles[item][:48]:<48}  {genres(item)}")
        header = "  ".join(f"{t:>6}" for t in rec.ranker.cfg.tasks)
        typer.echo(f"  top-{k} recommendations:\n    {'#':>2}  {'item':<48}  {header}  {'score':>6}  genres")
        for i, r in enumerate(rec.recommend(ctx, k, int(user.timestamps[-1]) + 1), 1):
            probs = "  ".join(f"{p:>6.3f}" for p in r.probabilities.values())
            typer.echo(f"    {i:>2}  {cat.titles[r.item][:48]:<48}  {probs}  {r.score:>6.3f}  {genres(r.item)}")


if __name__ == "__main__":
    app()
