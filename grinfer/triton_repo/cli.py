"""`grinfer export triton-repo`: a model directory -> a Triton Inference Server model repository."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, cast

import typer


def triton_repo(
    model: Annotated[Path, typer.Option(help="Model directory (a ranking checkpoint, or ranking/ + retrieval/).")],
    out: Annotated[Path, typer.Option(help="Repository directory to write (absent or empty).")],
    store: Annotated[str | None, typer.Option(help="Store to take the item catalogue from (as `grinfer serve "
                                                   "--store`); default: the one `grinfer serve` uses.")] = None,
    task_weights: Annotated[str, typer.Option(help="JSON task -> weight of the fused score, e.g. "
                                                   "'{\"ctr\": 1, \"ctcvr\": 2}'.")] = "{}",
    max_batch_size: Annotated[int, typer.Option(min=1, help="Requests Triton's batcher hands gr_model at once.")] = 8,
    kv_cache_mb: Annotated[int, typer.Option(min=1, help="gr_model's KV-cache size in MiB.")] = 256,
    device: Annotated[str, typer.Option(help="Where gr_model's one instance runs: cpu (float32) or cuda:N "
                                             "(that GPU, bfloat16).")] = "cpu",
    backend: Annotated[str, typer.Option(help="gr_model's engine backend: eager, compiled or fused (CUDA).")]
    = "eager",
    onnx: Annotated[bool, typer.Option(help="Also gr_model_onnx: the uncached ranking graph as an onnxruntime_onnx "
                                            "model (for servers with Triton's ONNX Runtime backend).")] = False,
) -> None:
    """Write a Triton model repository: preprocess_py -> embedding_service -> gr_model (grinfer's engine with
    its KV cache) -> interaction_python, chained by ensemble_model."""
    from grinfer.config import ServerConfig
    from grinfer.export.support import ExportError
    from grinfer.model.checkpoint import CheckpointError, load_checkpoint, read_checkpoint_meta
    from grinfer.serving.server import StartupError, model_dirs, resolve_catalog
    from grinfer.storage import open_store
    from grinfer.triton_repo.writer import RepoSettings, write_repository

    def fail(message: str) -> typer.Exit:
        typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
        return typer.Exit(2)

    try:
        weights = json.loads(task_weights)
        if not isinstance(weights, dict) or not all(isinstance(v, int | float) for v in weights.values()):
            raise ValueError
    except ValueError:
        raise fail(f"--task-weights: expected a JSON object of task -> number, got {task_weights!r}") from None
    gpu = None
    if device != "cpu":
        if not (device.startswith("cuda:") and device[5:].isdigit()):
            raise fail(f"--device: expected cpu or cuda:N (one GPU: the user's cache lives on it), got {device!r}")
        gpu = int(device[5:])
    if backend not in ("eager", "compiled", "fused"):
        raise fail(f"--backend: expected eager, compiled or fused, got {backend!r}")
    try:
        ranking_dir, _ = model_dirs(model)
        ranker = load_checkpoint(ranking_dir)
        unknown = sorted(set(weights) - set(ranker.cfg.tasks))
        if unknown:
            raise fail(f"--task-weights: unknown task(s) {unknown}; the model's tasks are {list(ranker.cfg.tasks)}")
        data_spec = read_checkpoint_meta(ranking_dir).get("training", {}).get("data")
        url = ServerConfig(store=store).with_store_for(data_spec, model).store  # filled in when unset
        opened = open_store(cast(str, url))
        try:
            catalog = resolve_catalog(opened, data_spec, ranker.cfg.num_items)
        finally:
            opened.close()
        settings = RepoSettings(kv_cache_mb=kv_cache_mb, max_batch_size=max_batch_size, task_weights=weights,
                                onnx=onnx, gpu=gpu, backend=backend)
        names = write_repository(ranking_dir, catalog, out, settings, ranker.cfg, progress=True)
    except (StartupError, CheckpointError, FileExistsError, ExportError, ValueError) as exc:
        raise fail(str(exc)) from None
    typer.echo(f"wrote {out}: {', '.join(names)} (serve: tritonserver --model-repository {out})")
