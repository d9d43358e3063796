"""Small checkpoints and their exports, made once per session (an AOTInductor compile takes about a minute)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from model_util import seeded_model
from typer.testing import CliRunner

from grinfer.cli import app
from grinfer.config import preset
from grinfer.model import build_model
from grinfer.model.checkpoint import save_checkpoint

NUM_ITEMS = 60
ONNX_MAX_BATCH, ONNX_MAX_CANDIDATES = 16, 300  # written into the graphs' axis ranges
STEP_BLOCK_SIZE = 4  # small pages: the test contexts span several, shuffled over the pool


def ranking_config():
    """mtgr-tiny with the relative bias on (randomised by seeded_model, so that it matters)."""
    return preset("mtgr-tiny").replace(num_items=NUM_ITEMS, rel_bias=True)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A --task both style directory: ranking/ (MTGR) and retrieval/ (causal HSTU)."""
    root = tmp_path_factory.mktemp("export-models")
    save_checkpoint(seeded_model(ranking_config(), seed=1), root / "ranking")
    torch.manual_seed(2)
    save_checkpoint(build_model(preset("hstu-ml1m").replace(num_items=NUM_ITEMS, max_seq_len=32)), root / "retrieval")
    return root


def run_cli(*args: str) -> tuple[int, str]:
    """(exit code, output) of `grinfer ARGS`."""
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


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
