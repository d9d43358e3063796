"""Checkpoints: a directory with config.json (the ModelConfig) and model.safetensors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from grinfer.config import ModelConfig
from grinfer.model import build_model
from grinfer.model.hstu import HSTURetrieval
from grinfer.model.mtgr import MTGR

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint directory is missing files or its config does not match its weights."""


def save_checkpoint(model: MTGR | HSTURetrieval, path: str | Path, extra: dict | None = None) -> Path:
    """Write config.json (+ `extra` metadata) and model.safetensors into `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if extra and "model" in extra:
        raise ValueError("extra: the key 'model' is reserved for the model config")
    meta = {"model": model.cfg.model_dump(mode="json"), **(extra or {})}
    (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path / WEIGHTS_FILE))
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


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> MTGR | HSTURetrieval:
    """Rebuild the model from config.json and load its weights; mismatches name the tensor."""
    path = Path(path)
    try:
        cfg = ModelConfig.model_validate(read_checkpoint_meta(path)["model"])
    except ValidationError as exc:
        raise CheckpointError(f"{path / CONFIG_FILE}: invalid model config: {exc}") from None
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{path}: missing {WEIGHTS_FILE}")
    model = build_model(cfg)
    expected = model.state_dict()
    state = load_file(str(weights), device=str(map_location))
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
