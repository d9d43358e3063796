"""Small checkpoints and their exports, made once per session (an AOTInductor compile takes about a minute)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from export_util import NUM_ITEMS, ONNX_MAX_BATCH, ONNX_MAX_CANDIDATES, STEP_BLOCK_SIZE, ranking_config, run_cli
from model_util import seeded_model

from grinfer.config import preset
from grinfer.model import build_model
from grinfer.model.checkpoint import save_checkpoint


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A --task both style directory: ranking/ (MTGR) and retrieval/ (causal HSTU)."""
    root = tmp_path_factory.mktemp("export-models")
    save_checkpoint(seeded_model(ranking_config(), seed=1), root / "ranking")
    torch.manual_seed(2)
    save_checkpoint(build_model(preset("hstu-ml1m").replace(num_items=NUM_ITEMS, max_seq_len=32)), root / "retrieval")
    return root


@pytest.fixture(scope="session")
def onnx_exports(model_dir, tmp_path_factory) -> dict[str, Path]:
    """`grinfer export onnx` of both models: part -> .onnx file."""
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    code, output = run_cli("export", "onnx", "--model", str(model_dir), "--out", str(out), "--no-progress",
                           "--max-batch", str(ONNX_MAX_BATCH), "--max-candidates", str(ONNX_MAX_CANDIDATES))
    assert code == 0, output
    return {part: out.with_name(f"model.{part}.onnx") for part in ("ranking", "retrieval")}


@pytest.fixture(scope="session")
def aoti_exports(model_dir, tmp_path_factory) -> dict[str, Path]:
    """`grinfer export aoti` of the ranking model: part (ranking, step) -> .pt2 package."""
    out = tmp_path_factory.mktemp("aoti") / "rank.pt2"
    code, output = run_cli("export", "aoti", "--model", str(model_dir / "ranking"), "--out", str(out),
                           "--block-size", str(STEP_BLOCK_SIZE), "--no-progress")
    assert code == 0, output
    return {part: out.with_name(f"rank.{part}.pt2") for part in ("ranking", "step")}
