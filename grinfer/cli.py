"""The `grinfer` command: wiring only; the work lives in grinfer.train, grinfer.recommend and friends."""

from __future__ import annotations

import itertools
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

from grinfer.config import env_var, grinfer_home, setting_doc, settings_help

# click's base of usage errors, whether typer vendors click (>= 0.24) or uses the installed one
_ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


class _OneLineErrors(TyperGroup):
    """Usage errors (a bad flag value, an unknown option) as one `error:` line with exit code 2."""

    def main(self, *args, **kwargs):
        try:
            code = super().main(*args, **{**kwargs, "standalone_mode": False})
        except _ClickException as exc:
            ctx = getattr(exc, "ctx", None)
            if type(exc).__name__ == "NoArgsIsHelpError":  # `grinfer` alone: the help, as before
                typer.echo(exc.format_message(), err=True)
            else:
                hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
                typer.echo(f"error: {exc.format_message()}{hint}", err=True)
            sys.exit(exc.exit_code)
        except typer.Abort:
            typer.echo("aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


# rich_markup_mode=None: plain help, so that "[auto]" or "[server]" are text, not markup
app = typer.Typer(help="grinfer: serve, train and evaluate generative recommenders (MTGR / HSTU).",
                  cls=_OneLineErrors, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode=None)

DataOpt = Annotated[str, typer.Option("--data", help="'synthetic', 'synthetic:users=N,items=N,events=N,seed=N' "
                                                      "or a MovieLens-1M directory.")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")]


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(2)


def _overrides(pairs: list[str]) -> tuple[dict, dict[str, str]]:
    """--set key=value pairs -> (JSON-parsed values (bare words stay strings), how each key was given)."""
    out, given = {}, {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise _fail(f"--set expects key=value (a model setting such as d_model=64), got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
        given[key] = f"--set {pair}"
    return out, given


def _model_configs(jobs: list[tuple[str, Path]], pairs: list[str]) -> list:
    """(preset with the --set overrides, output dir) per job; a bad preset or override is one error line."""
    from pydantic import ValidationError

    from grinfer.config import ModelConfig, one_line_error, preset

    values, given = _overrides(pairs)
    try:
        return [(preset(name).replace(**values), path) for name, path in jobs]
    except ValidationError as exc:
        raise _fail(one_line_error(exc, ModelConfig, given)) from None
    except ValueError as exc:
        raise _fail(str(exc)) from None


@app.command()
def train(
    out: Annotated[Path, typer.Option(help="Checkpoint directory to write.")],
    data: DataOpt = "synthetic",
    task: Annotated[str, typer.Option(help="ranking (MTGR), retrieval (causal HSTU) or both.")] = "ranking",
    preset_name: Annotated[str, typer.Option("--preset", help="Ranking preset (mtgr-tiny/small/medium/large), "
                                                               "or the retrieval preset for --task retrieval.")] = "",
    retrieval_preset: Annotated[str, typer.Option(help="Retrieval preset for --task both.")] = "hstu-ml1m",
    set_: Annotated[list[str], typer.Option("--set", metavar="KEY=VALUE",
                                            help="Override a config field, e.g. --set mask=causal "
                                                 "--set group_ln=false (repeatable).")] = [],  # noqa: B006
    epochs: Annotated[int | None, typer.Option(help="Epoch budget (early stopping may end sooner) [preset's "
                                                   "recipe]")] = None,
    batch_size: Annotated[int | None, typer.Option(help="[preset's recipe]")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate [preset's recipe]")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="[preset's recipe]")] = None,
    negatives: Annotated[int | None, typer.Option(help="Sampled-softmax negatives (retrieval) [128].")] = None,
    patience: Annotated[int | None, typer.Option(help="Stop after this many epochs without a better validation "
                                                     "metric; 0 = run the whole budget [preset's recipe]")] = None,
    warmup_steps: Annotated[int | None, typer.Option(help="Linear learning-rate warm-up steps [recipe]")] = None,
    decay: Annotated[str | None, typer.Option(help="none or cosine (over the budget) [preset's recipe]")] = None,
    group_lr_scale: Annotated[float | None, typer.Option(help="Learning-rate multiple of the per-group "
                                                              "LayerNorm parameters [1]")] = None,
    seed: int = 0, device: DeviceOpt = "auto",
    validate: Annotated[bool, typer.Option(help="Validate after every epoch: early stopping, best epoch saved "
                                                "(--no-validate: the whole budget, last epoch saved).")] = True,
) -> None:
    """Train a model (or both) on a dataset; writes checkpoint, metrics.json and loss.png."""
    from grinfer.data import load_dataset
    from grinfer.train.loop import resolve_device
    from grinfer.train.recipe import settings_for
    from grinfer.train.run import RANKING_DIR, RETRIEVAL_DIR, train_model

    if task not in ("ranking", "retrieval", "both"):
        raise _fail(f"--task must be ranking, retrieval or both, got {task!r}")
    jobs = {"ranking": [(preset_name or "mtgr-small", out)],
            "retrieval": [(preset_name or "hstu-ml1m", out)],
            "both": [(retrieval_preset, out / RETRIEVAL_DIR), (preset_name or "mtgr-small", out / RANKING_DIR)]}[task]
    configs = _model_configs(jobs, set_)
    if decay not in (None, "none", "cosine"):
        raise _fail(f"--decay must be none or cosine, got {decay!r}")
    try:
        ds = load_dataset(data)
        dev = resolve_device(device)
    except (ValueError, FileNotFoundError) as exc:
        raise _fail(str(exc)) from None
    given = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
             "num_negatives": negatives, "patience": patience, "warmup_steps": warmup_steps, "decay": decay,
             "group_lr_scale": group_lr_scale, "seed": seed, "device": dev}
    typer.echo(f"dataset {ds.name}: {len(ds.users)} users, {ds.catalog.num_items} items, {ds.num_events} events; "
               f"device {dev}")
    for cfg, path in configs:
        settings = settings_for(cfg.name, cfg.kind, **given)
        typer.echo(f"{cfg.name}: up to {settings.epochs} epochs (patience {settings.patience if validate else 'off'}), "
                   f"lr {settings.lr:g}, batch {settings.batch_size}, warm-up {settings.warmup_steps} steps, "
                   f"decay {settings.decay}")
        record = train_model(cfg, ds, data, settings, path, validate=validate)
        typer.echo(f"{cfg.name}: wrote {path} in {record['train_seconds']} s (epoch {record['saved_epoch']} of "
                   f"{record['epochs_run']} saved)")
        _print_metrics({k: record[k] for k in ("retrieval", "ranking") if k in record})


@app.command("eval")
def evaluate(
    model: Annotated[Path, typer.Option(help="Checkpoint directory (or a --task both output).")],
    data: Annotated[str | None, typer.Option(help="Dataset spec (as for train); default: the one the model "
                                                  "was trained on.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the metrics here.")] = None,
    device: DeviceOpt = "auto",
) -> None:
    """Retrieval HR/NDCG@10/50/200 and per-task ranking AUC/GAUC (docs: the evaluation protocol)."""
    from grinfer import load
    from grinfer.train.loop import resolve_device
    from grinfer.train.run import checkpoint_dirs, load_matching_dataset
    from grinfer.train.run import evaluate as evaluate_model

    try:
        dirs = checkpoint_dirs(model)
        dev = resolve_device(device)
        models = [load(d, map_location=dev) for d in dirs]
        ds = load_matching_dataset(data, dirs, [m.cfg for m in models])
    except (ValueError, FileNotFoundError) as exc:
        raise _fail(str(exc)) from None
    result: dict = {}
    for m in models:
        result.update(evaluate_model(m, ds, dev))
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
                                               "fused (CUDA), aoti (CPU), onnx, baseline, auto (probe, then the "
                                               "chosen one).")] = "eager",
    batch: Annotated[list[int], typer.Option(metavar="<int>",
                                             help="Batch size(s) (repeatable); default: the workload's.")]
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
    pipeline_depth: Annotated[list[int] | None, typer.Option(metavar="<int>", min=1, max=2,
                                                      help="Engine steps in flight, repeatable to compare: 1 "
                                                           "(synchronous) or 2 (pipelined, the default).")] = None,
    cuda_graphs: Annotated[bool, typer.Option(help="fused on CUDA: replay the layer stack from CUDA graphs.")]
    = True,
    dense: Annotated[list[str] | None, typer.Option(metavar="MODE", help="HSTU projections, repeatable to compare: "
                                                    "none (default), int8, int8-dynamic, fp8 (CUDA).")] = None,
    kv_dtype: Annotated[list[str] | None, typer.Option(metavar="DTYPE", help="KV-cache storage, repeatable to "
                                                       "compare: model (default), int8, fp8.")] = None,
    stream: Annotated[bool, typer.Option(help="Queue every timed batch at once (each on its own users) so the "
                                              "engine's steps follow back to back and pipeline: the sustained "
                                              "rate; latencies then include queueing.")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write results JSON (and a PNG beside it).")]
    = None,
    server: Annotated[str | None, typer.Option(help="Load-test a running server at this loopback URL instead "
                                                    "(closed loop over HTTP), e.g. http://127.0.0.1:8000.")]
    = None,
    clients: Annotated[list[str], typer.Option(metavar="N[,N...]",
                                               help="--server: concurrent client loops per level, repeatable "
                                                    "or comma-separated, e.g. 1,8,32,64.")] = ["1,8"],  # noqa: B006
    endpoint: Annotated[str, typer.Option(help="--server: recommend or rank.")] = "recommend",
    requests: Annotated[int, typer.Option(help="--server: requests per level (at most).")] = 400,
    duration: Annotated[float, typer.Option(help="--server: seconds per level (at most).")] = 30.0,
    protocol: Annotated[str, typer.Option(help="--server: rest, grpc, kserve-http, kserve-grpc or triton "
                                               "(docs/protocols.md).")] = "rest",
    grpc_target: Annotated[str | None, typer.Option(help="--protocol grpc / kserve-grpc: the server's gRPC "
                                                         "HOST:PORT.")] = None,
    triton_url: Annotated[str | None, typer.Option(help="--protocol triton: a KServe v2 server's loopback URL "
                                                        "(e.g. tritonserver's HTTP port).")] = None,
    triton_model: Annotated[str, typer.Option(help="--protocol triton: the model to call.")] = "ensemble_model",
) -> None:
    """Time workloads through the engine per backend: latency, throughput, TFLOP/s, memory, cache hits.

    With --server: closed-loop HTTP load against a running server on this machine instead.
    """
    if server is not None:
        import httpx

        from grinfer.bench.load import format_table, parse_clients, run_load, write_report

        try:
            levels = parse_clients(clients)
            results = run_load(server, levels, endpoint=endpoint, requests=requests, duration_s=duration,
                               candidates=100 if candidates is None else candidates, seed=seed, protocol=protocol,
                               grpc_target=grpc_target, triton_url=triton_url, triton_model=triton_model)
        except ValueError as exc:
            raise _fail(str(exc)) from None
        except httpx.HTTPError as exc:
            raise _fail(f"--server {server}: {exc}") from None
        settings = {"server": server, "endpoint": endpoint, "clients": levels, "requests": requests,
                    "duration_s": duration, "candidates": results[0].candidates, "seed": seed, "protocol": protocol}
        typer.echo(f"{endpoint} over {protocol} on {server}"
                   + (f", {results[0].candidates} candidates per request" if results[0].candidates else ""))
        typer.echo(format_table(results))
        if json_out:
            typer.echo(f"wrote {', '.join(str(f) for f in write_report(results, json_out, settings))}")
        return
    from grinfer.bench.run import matmul_ceiling, row_line, run_workload, write_report
    from grinfer.bench.workloads import workload
    from grinfer.engine.backends import BACKENDS
    from grinfer.train.loop import resolve_device

    names, kinds = [w for w in workloads.split(",") if w], [b for b in backends.split(",") if b]
    try:
        dev = resolve_device(device)
        known = [*BACKENDS, "onnx", "baseline", "auto"]
        for kind in kinds:
            if kind not in known:
                raise ValueError(f"--backends: unknown backend {kind!r}; choose from {', '.join(known)}")
        shapes = [workload(n, static=static, realtime=realtime, candidates=candidates, preset=preset_name,
                           batch=b) for n in names for b in (batch or [None])]
    except ValueError as exc:
        raise _fail(str(exc)) from None
    precisions = _precisions(dense or ["none"], kv_dtype or ["model"], dev)
    import torch

    ceiling = matmul_ceiling(torch.device(dev), torch.bfloat16 if dev.startswith("cuda") else torch.float32)
    overrides = {"host_cache_bytes": int(host_cache_gb * 1e9), "cuda_graphs": cuda_graphs}
    if max_batch_tokens is not None:
        overrides["max_batch_tokens"] = max_batch_tokens
    rows = []
    for w, kind, depth, (d, k) in itertools.product(shapes, kinds, pipeline_depth or [2], precisions):
        rows.append(run_workload(w, kind, dev, iters, warmup, seed,
                                 {**overrides, "pipeline_depth": depth, "dense": d, "kv_dtype": k}, stream=stream))
        typer.echo(row_line(rows[-1]), err=True)  # a run cut short still leaves its finished rows
    typer.echo(write_report(rows, ceiling, dev, json_out))


def _precisions(dense: list[str], kv_dtype: list[str], device: str) -> list[tuple[str, str]]:
    """bench's (dense, kv_dtype) pairs to run, each value checked (fp8 dense against the device)."""
    from grinfer.model.quantize_dense import DENSE_MODES, check_dense
    from grinfer.ops.reference.kv_quant import KV_DTYPES

    for flag, given, known in (("--dense", dense, DENSE_MODES), ("--kv-dtype", kv_dtype, KV_DTYPES)):
        for value in given:
            if value not in known:
                raise _fail(f"{flag}: unknown {value!r}; choose from {', '.join(known)}")
    try:
        for mode in dense:
            check_dense(mode, device)
    except ValueError as exc:
        raise _fail(f"--{exc}") from None
    return [(d, k) for d in dense for k in kv_dtype]


def _setting_help(name: str) -> str:
    """A serve flag's help: the setting's description, its environment variable and default."""
    description, default = setting_doc(name)
    return f"{description} [{env_var(name)}{'' if default == 'unset' else f', default {default}'}]"


def _serve_flag(name: str, kind: type = str):
    return Annotated[kind | None, typer.Option(help=_setting_help(name))]


SERVE_EPILOG = f"""Every setting is also a GRINFER_<NAME> environment variable and a key of the --config TOML
file: the server's in its [server] table, the engine's in its [engine] table; flags beat the
environment, which beats the file. All settings, with their defaults:

\b
{settings_help()}"""


@app.command(epilog=SERVE_EPILOG)
def serve(
    model: _serve_flag("model") = None,
    model_name: _serve_flag("model_name") = None,
    store: _serve_flag("store") = None,
    cache: _serve_flag("cache") = None,
    host: _serve_flag("host") = None,
    port: _serve_flag("port", int) = None,
    grpc_port: _serve_flag("grpc_port", int) = None,
    api_key: _serve_flag("api_key") = None,
    device: _serve_flag("device") = None,
    devices: _serve_flag("devices") = None,
    workers: _serve_flag("workers", int) = None,
    backend: _serve_flag("backend") = None,
    kv_cache_mb: _serve_flag("kv_cache_mb", int) = None,
    kv_host_mb: _serve_flag("kv_host_mb", int) = None,
    kv_disk_mb: _serve_flag("kv_disk_mb", int) = None,
    pipeline_depth: _serve_flag("pipeline_depth", int) = None,
    max_batch_tokens: _serve_flag("max_batch_tokens", int) = None,
    max_queue: _serve_flag("max_queue", int) = None,
    dense: _serve_flag("dense") = None,
    kv_dtype: _serve_flag("kv_dtype") = None,
    config: Annotated[str | None, typer.Option(help="A TOML file of these settings ([server] and [engine] "
                                                     "tables).")] = None,
) -> None:
    """Serve REST (+ OpenAPI at /docs, web page at /, /metrics) and gRPC."""
    import logging

    from grinfer.config import SettingError, load_server_config
    from grinfer.serving.ports import PortUnavailable, ensure_port_free

    # everything that can be checked is checked before the slow start-up work (and the torch import)
    try:
        cfg = load_server_config(config, model=model, model_name=model_name, store=store, cache=cache, host=host,
                                 port=port, grpc_port=grpc_port, api_key=api_key, device=device, devices=devices,
                                 workers=workers, backend=backend, kv_cache_mb=kv_cache_mb, kv_host_mb=kv_host_mb,
                                 kv_disk_mb=kv_disk_mb, pipeline_depth=pipeline_depth,
                                 max_batch_tokens=max_batch_tokens, max_queue=max_queue, dense=dense,
                                 kv_dtype=kv_dtype)
        ensure_port_free(cfg.host, cfg.port, "--port")
        if not cfg.grpc_reuse_port:
            ensure_port_free(cfg.host, cfg.grpc_port, "--grpc-port")
    except (SettingError, PortUnavailable) as exc:
        raise _fail(str(exc)) from None
    for key, value in cfg.compile_cache_env().items():
        os.environ.setdefault(key, value)
    if cfg.workers:  # before prometheus_client is imported: every process's metrics in one folder
        from grinfer.serving.workers import metrics_dir_env

        os.environ.update(metrics_dir_env(cfg))
    from grinfer.registry.plan import production_dir
    from grinfer.serving.server import StartupError, model_dirs, run
    from grinfer.train.loop import resolve_device
    from grinfer.train.run import DEMO_DATA, demo_models_ready, ensure_demo_models, training_data_spec

    try:
        dev = resolve_device(cfg.device)
        if cfg.model_name:  # a registered model starts from its production version's (hash-checked) directory
            model_path = production_dir(cfg.store, cfg.model_name)
            data_spec = training_data_spec(model_dirs(model_path)[0])
        elif cfg.model:
            model_path = Path(cfg.model).expanduser()
            data_spec = training_data_spec(model_dirs(model_path)[0])
        else:
            model_path, data_spec = demo_model_dir(cfg.home_dir), DEMO_DATA
    except (StartupError, ValueError) as exc:
        raise _fail(str(exc)) from None
    cfg = cfg.with_store_for(data_spec, model_path)
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    train = None
    if not cfg.model and not cfg.model_name:
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
    store: Annotated[str | None, typer.Option(help="Target store URL; default: the store `grinfer serve` uses for "
                                                   "a model trained on this directory (under GRINFER_HOME).")]
    = None,
) -> None:
    """Load a MovieLens directory into a store (catalogue, profiles, events as static history)."""
    from grinfer.config import default_store_url
    from grinfer.data import DataFormatError, read_movielens
    from grinfer.storage import open_store
    from grinfer.storage.importer import import_dataset

    store = store or default_store_url(str(path), grinfer_home())
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


from grinfer.importers.command import import_checkpoint_command  # noqa: E402

app.command("import-checkpoint")(import_checkpoint_command)


@app.command()
def quantize(
    model: Annotated[Path, typer.Option("--model", help="The full-precision checkpoint directory.")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the converted checkpoint.")],
    embeddings: Annotated[str | None, typer.Option(help="Row format of every sparse embedding table: int8, int4 "
                                                        "(row-wise, a scale and bias per row), fp16 or bf16.")]
    = None,
    dense: Annotated[str | None, typer.Option(help="Serve the HSTU projections as int8 (weight-only), "
                                                   "int8-dynamic or fp8 (CUDA); recorded in config.json, applied "
                                                   "when the engine loads the model.")] = None,
) -> None:
    """Convert a checkpoint to low precision (a new checkpoint directory that loads wherever the original does)."""
    from grinfer.model.checkpoint import CheckpointError
    from grinfer.model.quantize import QuantizeOptions, quantize_checkpoint

    try:
        summary = quantize_checkpoint(model, out, QuantizeOptions(embeddings=embeddings, dense=dense))
    except (ValueError, CheckpointError) as exc:
        raise _fail(str(exc)) from None
    before, after = sum(r["fp32_bytes"] for r in summary), sum(r["bytes"] for r in summary)
    tables = f"{len(summary)} tables as {embeddings}, {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB"
    typer.echo(f"wrote {out}: " + "; ".join(p for p in (embeddings and tables, dense and f"dense {dense}") if p))


@app.command("init-model")
def init_model(
    preset_name: Annotated[str, typer.Option("--preset", help="Model preset, e.g. mtgr-8b.")],
    out: Annotated[Path, typer.Option("--out", help="Checkpoint directory to write.")],
    embeddings: Annotated[str, typer.Option(help="Row format of the sparse tables (int8, int4, fp16, bf16, "
                                                 "fp32).")] = "int8",
    set_: Annotated[list[str], typer.Option("--set", metavar="KEY=VALUE",
                                            help="Override a model setting (repeatable), e.g. num_items=20000.")]
    = [],  # noqa: B006
    seed: int = 0,
    data: Annotated[str | None, typer.Option(metavar="SPEC", help="Record this dataset (a MovieLens dir or "
                                                "synthetic:users=N,items=M,...) as the training data, so that "
                                                "`grinfer serve --model OUT` fills its store from it.")] = None,
) -> None:
    """Write a randomly initialised checkpoint, its tables streamed in chunks (bounded memory)."""
    from tqdm import tqdm

    from grinfer.embedding.formats import ROW_FORMATS
    from grinfer.model.random_init import parameter_count, total_table_rows, write_random_checkpoint

    [(cfg, _)] = _model_configs([(preset_name, out)], set_)
    if embeddings not in ROW_FORMATS:
        raise _fail(f"--embeddings: unknown row format {embeddings!r}; choose one of {', '.join(ROW_FORMATS)}")
    with tqdm(total=total_table_rows(cfg), unit="row", unit_scale=True, desc="embedding rows") as bar:
        try:
            write_random_checkpoint(cfg, out, embeddings, seed=seed, progress=bar.update, data=data)
        except ValueError as exc:
            raise _fail(str(exc)) from None
    typer.echo(f"wrote {out}: {cfg.name}, {parameter_count(cfg):,} parameters, tables as {embeddings}")


@app.command("bench-embeddings")
def bench_embeddings(
    model: Annotated[Path, typer.Option("--model", help="A ranking checkpoint with served tables (grinfer "
                                                        "quantize / init-model).")],
    batch: int = 8, static: int = 200, realtime: int = 20, candidates: int = 128, iters: int = 2,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the result JSON here.")] = None,
) -> None:
    """Time a checkpoint with memory-mapped tables: start-up, peak RSS, ranking with a cold and a warm row
    cache, and the embedding service's rows/s alone."""
    from grinfer.bench.embeddings import format_report, run
    from grinfer.model.checkpoint import CheckpointError

    try:
        result = run(model, batch, static, realtime, candidates, iters)
    except (ValueError, CheckpointError) as exc:
        raise _fail(str(exc)) from None
    typer.echo(format_report(result))
    if json_out:
        json_out.write_text(json.dumps(result, indent=2) + "\n")

from grinfer.registry.cli import models_app  # noqa: E402

app.add_typer(models_app, name="models")

from grinfer.deploy.cli import deploy_app  # noqa: E402

app.add_typer(deploy_app, name="deploy")

from grinfer.export.cli import aoti_command, onnx_command, verify_command  # noqa: E402
from grinfer.triton_repo.cli import triton_repo  # noqa: E402

export_app = typer.Typer(help="Export a model for other runtimes (ONNX, AOTInductor, Triton Inference Server).",
                         no_args_is_help=True)
app.add_typer(export_app, name="export")
export_app.command("triton-repo")(triton_repo)
export_app.command("onnx")(onnx_command)
export_app.command("aoti")(aoti_command)
export_app.command("verify")(verify_command)


def demo_model_dir(home: Path) -> Path:
    """Where the demo models are cached: GRINFER_HOME/demo-VERSION-fN."""
    from grinfer import __version__
    from grinfer.features.featurizer import FEATURES_VERSION

    return home / f"demo-{__version__}-f{FEATURES_VERSION}"


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
    from grinfer.recommend import Recommender
    from grinfer.train.loop import resolve_device
    from grinfer.train.run import DEMO_DATA, RANKING_DIR, RETRIEVAL_DIR, ensure_demo_models, load_matching_dataset

    try:
        dev = resolve_device(device)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    if model is None:
        model = demo_model_dir(grinfer_home())
        if retrain or not (model / RANKING_DIR / "config.json").is_file():
            typer.echo(f"training the demo models on {DEMO_DATA} (cached in {model}) ...")
        ensure_demo_models(model, dev, retrain)
    ranking_dir = model / RANKING_DIR if (model / RANKING_DIR).is_dir() else model
    retrieval_dir = model / RETRIEVAL_DIR
    try:
        ranker = load(ranking_dir, map_location=dev)
        retriever = load(retrieval_dir, map_location=dev) if retrieval_dir.is_dir() else None
        loaded = [(ranking_dir, ranker)] + ([(retrieval_dir, retriever)] if retriever is not None else [])
        ds = load_matching_dataset(data, [d for d, _ in loaded], [m.cfg for _, m in loaded])
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
