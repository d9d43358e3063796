"""Shared by the export tests: the small ranking config, export settings and a CLI runner."""

from __future__ import annotations

from typer.testing import CliRunner

from grinfer.cli import app
from grinfer.config import preset

NUM_ITEMS = 60
ONNX_MAX_BATCH, ONNX_MAX_CANDIDATES = 16, 300  # written into the graphs' axis ranges
STEP_BLOCK_SIZE = 4  # small pages: the test contexts span several, shuffled over the pool


def ranking_config():
    """mtgr-tiny with the relative bias on (randomised by seeded_model, so that it matters)."""
    return preset("mtgr-tiny").replace(num_items=NUM_ITEMS, rel_bias=True)


def run_cli(*args: str) -> tuple[int, str]:
    """(exit code, output) of `grinfer ARGS`."""
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output
