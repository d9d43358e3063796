"""Train / evaluate entry points used by the CLI: dataset -> model -> checkpoint + metrics + plot."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from grinfer.config import ModelConfig
from grinfer.data.types import Dataset
from grinfer.features.featurizer import NUM_CROSS_FEATURES, Featurizer
from grinfer.model import build_model
from grinfer.model.checkpoint import read_checkpoint_meta, save_checkpoint
from grinfer.model.hstu import HSTURetrieval
from grinfer.model.mtgr import MTGR
from grinfer.train.loop import TrainSettings
from grinfer.train.plots import plot_history
from grinfer.train.ranking import evaluate_ranking, train_ranking
from grinfer.train.retrieval import evaluate_retrieval, train_retrieval

RANKING_DIR, RETRIEVAL_DIR = "ranking", "retrieval"


def config_for(cfg: ModelConfig, ds: Dataset) -> ModelConfig:
    """Fill a preset's vocabulary sizes from the dataset."""
    cat = ds.catalog
    return cfg.with_vocab(num_items=cat.num_items, num_genres=cat.num_genres,
                          num_year_buckets=max(cfg.num_year_buckets, cat.num_year_buckets),
                          profile_cardinalities=tuple(ds.profile_cardinalities),
                          num_cross_features=NUM_CROSS_FEATURES if cfg.kind == "mtgr" else 0)


def train_model(cfg: ModelConfig, ds: Dataset, data_spec: str, settings: TrainSettings, out: Path,
                validate: bool = True) -> dict:
    """Train one model, evaluate it, write its checkpoint, metrics.json and loss.png into `out`."""
    torch.manual_seed(settings.seed)
    torch.set_float32_matmul_precision("high")  # TF32 on GPUs that have it
    cfg = config_for(cfg, ds)
    model = build_model(cfg).to(settings.device)
    start = time.perf_counter()
    if isinstance(model, HSTURetrieval):
        fitted = train_retrieval(model, ds, settings, validate=validate)
    else:
        fitted = train_ranking(model, ds, Featurizer(ds.catalog, cfg.num_time_buckets), settings, validate=validate)
    seconds = time.perf_counter() - start
    metrics = evaluate(model, ds, settings.device)
    history = fitted.history
    record = {"data": data_spec, "dataset": ds.name, "device": settings.device, "train_seconds": round(seconds, 1),
              "settings": settings.__dict__, "epochs_run": len(history), "best_epoch": fitted.best_epoch,
              "best_validation": fitted.best_value, "stopped_early": fitted.stopped_early,
              "saved_epoch": fitted.best_epoch or len(history), "history": history, **metrics}
    save_checkpoint(model.cpu(), out, extra={"training": {k: record[k] for k in ("data", "dataset", "device")}})
    (out / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")
    plot_history({f"{cfg.name} ({cfg.kind})": history}, out / "loss.png")
    return record


def evaluate(model: MTGR | HSTURetrieval, ds: Dataset, device: str) -> dict:
    """The evaluation section for one model: {"retrieval": {...}} or {"ranking": {...}}."""
    model = model.to(device)
    if isinstance(model, HSTURetrieval):
        return {"retrieval": evaluate_retrieval(model, ds, "test", device)}
    return {"ranking": evaluate_ranking(model, ds, Featurizer(ds.catalog, model.cfg.num_time_buckets), device)}


def checkpoint_dirs(path: Path) -> list[Path]:
    """The checkpoint(s) at `path`: the directory itself, or its ranking/ and retrieval/ parts."""
    if (path / "config.json").is_file():
        return [path]
    found = [path / d for d in (RETRIEVAL_DIR, RANKING_DIR) if (path / d / "config.json").is_file()]
    if not found:
        raise FileNotFoundError(f"{path}: no checkpoint (config.json) here or in {RANKING_DIR}/, {RETRIEVAL_DIR}/")
    return found


def training_data_spec(path: Path) -> str | None:
    """The dataset spec a checkpoint was trained on, if it recorded one."""
    return read_checkpoint_meta(path).get("training", {}).get("data")


def load_matching_dataset(spec: str | None, dirs: list[Path], configs: list[ModelConfig]) -> Dataset:
    """Dataset `spec` (default: the one the first checkpoint was trained on), checked against each model's
    vocabulary; ValueError naming --data when a model cannot score it."""
    from grinfer.data import load_dataset

    spec = spec or training_data_spec(dirs[0])
    if spec is None:
        raise ValueError(f"--data: {dirs[0]} records no training dataset; give --data")
    ds = load_dataset(spec)
    cat = ds.catalog
    for path, cfg in zip(dirs, configs):
        why = cfg.vocab_mismatch(cat.num_items, cat.num_genres, cat.num_year_buckets, ds.profile_cardinalities)
        if why is not None:
            raise ValueError(f"--data {spec}: the model in {path} cannot score this dataset: {why}; use the "
                             f"dataset it was trained on ({training_data_spec(path) or 'not recorded'})")
    return ds


DEMO_DATA = "synthetic:users=600,items=500,events=60,seed=0"


def demo_models_ready(path: Path) -> bool:
    """Whether `path` holds both trained demo checkpoints."""
    return all((path / d / "config.json").is_file() for d in (RANKING_DIR, RETRIEVAL_DIR))


def ensure_demo_models(path: Path, device: str, retrain: bool = False,
                       on_model: Callable[[int, int, str], None] = lambda i, n, name: None) -> Path:
    """The small demo checkpoints (retrieval + mtgr-tiny ranking on synthetic data), trained once and cached;
    `on_model(i, n, name)` is told before the i-th of n models is trained."""
    from grinfer.config import preset
    from grinfer.data import load_dataset

    if retrain or not demo_models_ready(path):
        ds = load_dataset(DEMO_DATA)
        settings = TrainSettings(epochs=3, batch_size=64, lr=3e-3, device=device)
        jobs = [("retrieval", preset("hstu-ml1m").replace(max_seq_len=64, dropout=0.1), RETRIEVAL_DIR),
                ("ranking", preset("mtgr-tiny"), RANKING_DIR)]
        for i, (name, cfg, folder) in enumerate(jobs):
            on_model(i, len(jobs), name)
            train_model(cfg, ds, DEMO_DATA, settings, path / folder, validate=False)
    return path
