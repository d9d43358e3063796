"""`grinfer init-model`: a randomly initialised checkpoint written in bounded memory, its sparse tables
generated and encoded a chunk of rows at a time straight into the safetensors file (so a model whose
tables exceed memory, such as the mtgr-8b preset, can be written on a small machine)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from grinfer.config import ModelConfig
from grinfer.embedding.formats import check_format, encode_rows
from grinfer.embedding.safetensors_io import StreamingWriter
from grinfer.model import build_model
from grinfer.model.checkpoint import CONFIG_FILE, EMBEDDINGS, WEIGHTS_FILE
from grinfer.model.tables import table_shapes

CHUNK_ROWS = 1 << 19


def parameter_count(cfg: ModelConfig) -> int:
    """Parameters of the model: its sparse tables plus its dense weights (built without the tables)."""
    shapes = table_shapes(cfg)
    dense = build_model(cfg, {name: nn.Module() for name in shapes})
    return sum(s.rows * s.dim for s in shapes.values()) + sum(p.numel() for p in dense.parameters())


def write_random_checkpoint(cfg: ModelConfig, out: str | Path, fmt: str = "int8", seed: int = 0,
                            chunk_rows: int = CHUNK_ROWS, progress: Callable[[int], None] | None = None,
                            data: str | None = None) -> Path:
    """Write a random `cfg` model to `out` with every sparse table in row format `fmt` (rows drawn as
    nn.Embedding initialises them, N(0, 1)); `progress(n)` is called after each chunk of n rows. `data` is
    recorded as the training dataset, so `grinfer serve --model OUT` fills its store from it."""
    shapes = table_shapes(cfg)
    for shape in shapes.values():
        check_format(fmt, shape.dim)
    torch.manual_seed(seed)
    dense = build_model(cfg, {name: nn.Module() for name in shapes}).state_dict()
    layout: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {k: (v.dtype, tuple(v.shape)) for k, v in dense.items()}
    for name, shape in shapes.items():
        for part, t in encode_rows(torch.zeros(1, shape.dim), fmt).items():
            layout[f"{name}.{part}"] = (t.dtype, (shape.rows, *t.shape[1:]))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    with StreamingWriter(out / WEIGHTS_FILE, layout) as writer:
        for key, tensor in dense.items():
            writer.write(key, 0, tensor)
        for name, shape in shapes.items():
            for first in range(0, shape.rows, chunk_rows):
                n = min(chunk_rows, shape.rows - first)
                for part, t in encode_rows(torch.randn(n, shape.dim, generator=generator), fmt).items():
                    writer.write(f"{name}.{part}", first, t)
                if progress is not None:
                    progress(n)
    meta = {"model": cfg.model_dump(mode="json"), EMBEDDINGS: dict.fromkeys(shapes, fmt),
            "init": {"random": True, "seed": seed}}
    if data is not None:
        meta["training"] = {"data": data}
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def total_table_rows(cfg: ModelConfig) -> int:
    """Rows init-model generates (its progress bar's total)."""
    return sum(s.rows for s in table_shapes(cfg).values())
