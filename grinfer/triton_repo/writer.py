"""Write the model repository: five models, each a config.pbtxt and a version folder 1/.

    preprocess_py       raw request tensors -> checked, windowed context      (Python backend)
    embedding_service   catalogue ids -> embedding-table rows                (Python backend, catalog.npz)
    gr_model            grinfer's Engine: paged per-user KV cache, batching  (Python backend, checkpoint/)
    interaction_python  probabilities -> fused score -> top-k                (Python backend)
    ensemble_model      the four chained: what clients call
    gr_model_onnx       (with onnx) the uncached ranking graph, for Triton's ONNX Runtime backend

Paths are `parameters` relative to the version folder, so the repository can be moved or copied whole.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from grinfer.data.types import ItemCatalog
from grinfer.model.checkpoint import load_checkpoint
from grinfer.triton_repo.catalog_file import save_catalog
from grinfer.triton_repo.pbtxt import Tensor, model_config

ENSEMBLE, PREPROCESS, EMBEDDING, GR_MODEL, INTERACTION = (
    "ensemble_model", "preprocess_py", "embedding_service", "gr_model", "interaction_python")
MODULES = {PREPROCESS: "preprocess", EMBEDDING: "embedding", GR_MODEL: "gr_model", INTERACTION: "interaction"}


@dataclass(frozen=True)
class RepoSettings:
    """What the repository's models are configured with (defaults: those of `grinfer serve`)."""

    max_static: int = 1000
    max_realtime: int = 100
    kv_cache_mb: int = 256
    max_batch_tokens: int = 16384
    max_queue: int = 256
    max_batch_size: int = 8  # requests the dynamic batcher hands gr_model at once
    batching_delay_us: int = 500
    task_weights: dict[str, float] | None = None
    onnx: bool = False  # also gr_model_onnx, the uncached graph for Triton's ONNX Runtime backend
    gpu: int | None = None  # gr_model's one instance on this GPU (bf16), else on the CPU (fp32)
    backend: str = "eager"  # the engine's backend (eager, compiled, fused on CUDA)


def _vec(name: str, dtype: str = "INT64", **kw) -> Tensor:
    return Tensor(name, dtype, (-1,), **kw)


def _one(name: str, dtype: str = "INT64", **kw) -> Tensor:
    return Tensor(name, dtype, (1,), **kw)


def _row(name: str, dtype: str = "INT64") -> Tensor:
    return Tensor(name, dtype, (1, -1))


def _cell(name: str, dtype: str = "INT64") -> Tensor:
    return Tensor(name, dtype, (1, 1))


def request_inputs() -> list[Tensor]:
    """The raw request tensors clients send to ensemble_model (and preprocess_py takes).

    All are declared optional, the required ones too: Triton's ensemble scheduler answers a request that
    lacks a required input with "unexpected deadlock"; so preprocess_py checks them and names the missing one.
    NUM_STATIC (default: every event is static history), HISTORY_VERSION (0), REQUEST_TS (now) and TOP_K (all
    candidates) may be left out."""
    return [_one("USER_ID", "BYTES", optional=True)] + \
        [_vec(n, optional=True) for n in ("PROFILE", "EVENT_ITEMS", "EVENT_TIMESTAMPS", "EVENT_ACTIONS",
                                          "CANDIDATE_ITEMS")] + \
        [_one(n, optional=True) for n in ("NUM_STATIC", "HISTORY_VERSION", "REQUEST_TS", "TOP_K")]


def configs(model_cfg, settings: RepoSettings) -> dict[str, str]:
    """config.pbtxt text of each model, by model name."""
    tasks = len(model_cfg.tasks)
    context = ["CONTEXT_ITEMS", "CONTEXT_TIMESTAMPS", "CONTEXT_ACTIONS"]
    pre_out = [_cell("USER", "BYTES"), _cell("HISTORY_VERSION"), _row("PROFILE_IDS"), *map(_row, context),
               _cell("NUM_STATIC"), _row("CANDIDATES"), _cell("REQUEST_TS"), _cell("TOP_K")]
    gr_in = [_one("USER", "BYTES"), _one("HISTORY_VERSION"), _vec("PROFILE_IDS", ragged=True),
             _vec("CONTEXT_IDS", ragged=True), _vec("CONTEXT_TIMESTAMPS", ragged=True),
             _vec("CONTEXT_ACTIONS", ragged=True), _one("NUM_STATIC"), _vec("CANDIDATE_IDS", ragged=True),
             _one("REQUEST_TS")]
    gr_out = [Tensor("PROBABILITIES", "FP32", (-1, tasks)), _one("CACHE", "BYTES"), _one("CACHED_TOKENS"),
              _one("COMPUTED_TOKENS")]
    ranked = [_vec("ITEMS"), _vec("SCORES", "FP32"), Tensor("TASK_PROBABILITIES", "FP32", (-1, tasks))]
    engine = {"checkpoint": "checkpoint", "catalog": f"../../{EMBEDDING}/1/catalog.npz", "backend": settings.backend,
              "kv_cache_mb": str(settings.kv_cache_mb), "max_batch_tokens": str(settings.max_batch_tokens),
              "max_queue": str(settings.max_queue), "max_realtime": str(settings.max_realtime)}
    own = {n: n for n in ("USER_ID", "PROFILE", "EVENT_ITEMS", "EVENT_TIMESTAMPS", "EVENT_ACTIONS",
                          "CANDIDATE_ITEMS", "NUM_STATIC", "HISTORY_VERSION", "REQUEST_TS", "TOP_K")}
    lower = lambda names: {n: n.lower() for n in names}
    steps = [
        (PREPROCESS, own, lower(["USER", "HISTORY_VERSION", "PROFILE_IDS", *context, "NUM_STATIC", "CANDIDATES",
                                 "REQUEST_TS", "TOP_K"])),
        (EMBEDDING, lower(["CONTEXT_ITEMS", "CANDIDATES"]), lower(["CONTEXT_IDS", "CANDIDATE_IDS"])),
        (GR_MODEL, lower(["USER", "HISTORY_VERSION", "PROFILE_IDS", "CONTEXT_IDS", "CONTEXT_TIMESTAMPS",
                          "CONTEXT_ACTIONS", "NUM_STATIC", "CANDIDATE_IDS", "REQUEST_TS"]),
         {"PROBABILITIES": "probabilities", "CACHE": "CACHE", "CACHED_TOKENS": "CACHED_TOKENS",
          "COMPUTED_TOKENS": "COMPUTED_TOKENS"}),
        (INTERACTION, lower(["PROBABILITIES", "CANDIDATES", "TOP_K"]),
         {"ITEMS": "ITEMS", "SCORES": "SCORES", "TASK_PROBABILITIES": "PROBABILITIES"}),
    ]
    return {
        PREPROCESS: model_config(PREPROCESS, request_inputs(), pre_out, backend="python", instances=1, parameters={
            "profile_cardinalities": json.dumps(list(model_cfg.profile_cardinalities)),
            "max_static": str(settings.max_static), "max_realtime": str(settings.max_realtime)}),
        EMBEDDING: model_config(EMBEDDING, [_row("CONTEXT_ITEMS"), _row("CANDIDATES")],
                                [_row("CONTEXT_IDS"), _row("CANDIDATE_IDS")], backend="python", instances=1,
                                parameters={"catalog": "catalog.npz"}),
        GR_MODEL: model_config(GR_MODEL, gr_in, gr_out, backend="python", max_batch_size=settings.max_batch_size,
                               instances=1, gpu=settings.gpu, batching_delay_us=settings.batching_delay_us,
                               parameters=engine),
        INTERACTION: model_config(INTERACTION, [Tensor("PROBABILITIES", "FP32", (1, -1, tasks)), _row("CANDIDATES"),
                                                _cell("TOP_K")], ranked, backend="python", instances=1,
                                  parameters={"tasks": json.dumps(list(model_cfg.tasks)),
                                              "task_weights": json.dumps(settings.task_weights or {})}),
        ENSEMBLE: model_config(ENSEMBLE, request_inputs(), [
            _vec("ITEMS"), _vec("SCORES", "FP32"), Tensor("PROBABILITIES", "FP32", (-1, tasks)),
            _one("CACHE", "BYTES"), _one("CACHED_TOKENS"), _one("COMPUTED_TOKENS")],
            platform="ensemble", ensemble_steps=steps),
    }


def write_repository(ranking_dir: Path, catalog: ItemCatalog, out: Path, settings: RepoSettings = RepoSettings(),
                     model_cfg=None, progress: bool = False) -> list[str]:
    """Write the repository for the ranking checkpoint `ranking_dir` to `out` (which must be absent or empty);
    returns the model names."""
    model_cfg = model_cfg or load_checkpoint(ranking_dir).cfg
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--out: {out} is not empty; give a new directory")
    texts = configs(model_cfg, settings)
    for name, text in texts.items():
        version = out / name / "1"
        version.mkdir(parents=True)
        (out / name / "config.pbtxt").write_text(text)
        if name in MODULES:
            (version / "model.py").write_text(
                f'"""{name}: grinfer.triton_repo.{MODULES[name]} (install grinfer in Triton\'s Python environment)."""'
                f"\n\nfrom grinfer.triton_repo.{MODULES[name]} import TritonPythonModel  # noqa: F401\n")
    shutil.copytree(ranking_dir, out / GR_MODEL / "1" / "checkpoint")
    save_catalog(catalog, out / EMBEDDING / "1" / "catalog.npz")
    names = list(texts)
    if settings.onnx:
        from grinfer.export.artifacts import Limits
        from grinfer.schema import MAX_CANDIDATES
        from grinfer.triton_repo.onnx_model import write_onnx_model

        limits = Limits(static=settings.max_static, realtime=settings.max_realtime, candidates=MAX_CANDIDATES)
        names.append(write_onnx_model(ranking_dir, out, limits, progress))
    return names
