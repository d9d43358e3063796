"""Checkpoints: a directory with config.json (the ModelConfig) and model.safetensors.

A quantised checkpoint's config.json also has an "embeddings" section (table module path -> row format,
grinfer.embedding.formats) and its safetensors hold those tables' stored parts (`item_emb.data`,
`.scale`, `.bias`) instead of `item_emb.weight`. It loads with the tables as served tables that read the rows
looked up from the file (pread, through the OS page cache; the tensors are memory-mapped for state_dict and
whole-table reads); the dense weights are read into memory as usual."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from grinfer.config import ModelConfig
from grinfer.embedding.safetensors_io import mmap_tensors
from grinfer.embedding.service import DEFAULT_CACHE_BYTES, take_tables
from grinfer.embedding.table import ServedTable
from grinfer.model import build_model
from grinfer.model.hstu import HSTURetrieval
from grinfer.model.mtgr import MTGR
from grinfer.model.tables import table_shapes

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
EMBEDDINGS = "embeddings"  # config.json: table path -> row format


class CheckpointError(ValueError):
    """A checkpoint directory is missing files or its config does not match its weights."""


def save_checkpoint(model: MTGR | HSTURetrieval, path: str | Path, extra: dict | None = None) -> Path:
    """Write config.json (+ `extra` metadata) and model.safetensors into `path` (served tables as stored)."""
    if extra and ("model" in extra or EMBEDDINGS in extra):
        raise ValueError(f"extra: the keys 'model' and {EMBEDDINGS!r} are reserved for the model config and tables")
    formats = {name: m.store.fmt for name, m in model.named_modules() if isinstance(m, ServedTable)}
    meta = {"model": model.cfg.model_dump(mode="json"), **({EMBEDDINGS: formats} if formats else {}), **(extra or {})}
    return write_checkpoint(path, meta, model.state_dict())


def write_checkpoint(path: str | Path, meta: dict, state: dict[str, torch.Tensor]) -> Path:
    """Write config.json (`meta`) and model.safetensors (`state`) into `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path / WEIGHTS_FILE))
    # safetensors writes the file 0600; give it config.json's mode, i.e. what the umask allows
    os.chmod(path / WEIGHTS_FILE, (path / CONFIG_FILE).stat().st_mode & 0o777)
    return path


def read_checkpoint_meta(path: str | Path) -> dict:
    """The parsed config.json of a checkpoint directory."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{path}: not a checkpoint directory (no {CONFIG_FILE})")
    try:
        meta = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or "model" not in meta:
        raise CheckpointError(f"{file}: no 'model' section with the model config")
    return meta


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    row_cache_bytes: int = DEFAULT_CACHE_BYTES) -> MTGR | HSTURetrieval:
    """Rebuild the model from config.json and load its weights; mismatches name the tensor. A quantised
    checkpoint's tables are served memory-mapped, each with a device row cache of `row_cache_bytes`."""
    path = Path(path)
    meta = read_checkpoint_meta(path)
    try:
        cfg = ModelConfig.model_validate(meta["model"])
    except ValidationError as exc:
        raise CheckpointError(f"{path / CONFIG_FILE}: invalid model config: {exc}") from None
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{path}: missing {WEIGHTS_FILE}")
    formats, shapes = meta.get(EMBEDDINGS, {}), table_shapes(cfg)
    unknown = sorted(set(formats) - set(shapes))
    if unknown:
        raise CheckpointError(f"{path / CONFIG_FILE}: {EMBEDDINGS}: {unknown[0]!r} is not one of the model's tables "
                              f"({', '.join(shapes)})")
    if formats:  # tables stay memory-mapped; the dense weights are copied into the model below
        state = mmap_tensors(weights)
        try:
            tables = take_tables(state, formats, {n: s.hashed for n, s in shapes.items()}, row_cache_bytes, weights)
        except ValueError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
        for name, table in tables.items():
            if (table.num_embeddings, table.embedding_dim) != (shapes[name].rows, shapes[name].dim):
                raise CheckpointError(f"{path}: table {name!r} has {table.num_embeddings} x {table.embedding_dim} "
                                      f"rows in {WEIGHTS_FILE} but config.json implies {shapes[name].rows} x "
                                      f"{shapes[name].dim}")
    else:
        state, tables = load_file(str(weights), device=str(map_location)), {}
    model = build_model(cfg, tables)
    expected = {k: v for k, v in model.state_dict().items() if k.rpartition(".")[0] not in tables}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: config.json does not match {WEIGHTS_FILE}: "
                              f"missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {list(tensor.shape)} in {WEIGHTS_FILE} but config.json "
                f"(d_model={cfg.d_model}, num_items={cfg.num_items}, ...) implies {list(expected[name].shape)}")
    model.load_state_dict(state)
    return model.to(map_location).eval()
