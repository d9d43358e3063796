"""The embedding service of a model: its served tables built from a checkpoint's stored parts, and their
stats (lookups, cache hit ratio) for the metrics."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from grinfer.embedding.cache import TAG_BYTES
from grinfer.embedding.formats import part_names, row_dim
from grinfer.embedding.hashing import HashedIds, IdentityIds
from grinfer.embedding.safetensors_io import FileRows
from grinfer.embedding.store import RowStore
from grinfer.embedding.table import ServedTable

DEFAULT_CACHE_BYTES = 256 << 20  # per table; a table smaller than this gets a cache that holds all of it


def served_table(parts: dict[str, torch.Tensor], fmt: str, hashed: bool, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 files: dict[str, FileRows] | None = None) -> ServedTable:
    """A served table over stored parts (read from `files` where given): rows keyed by hashed raw ids or by
    position (identity)."""
    store = RowStore(parts, fmt, files)
    ids = HashedIds(store.num_rows) if hashed else IdentityIds(store.num_rows)
    # a cache larger than its table is wasted: twice the table's rows keeps a set-associative cache's conflicts rare
    whole = 2 * store.num_rows * (row_dim(parts, fmt) * 4 + TAG_BYTES)
    return ServedTable(store, ids, min(cache_bytes, whole))


def take_tables(state: dict[str, torch.Tensor], formats: Mapping[str, str], hashed: Mapping[str, bool],
                cache_bytes: int = DEFAULT_CACHE_BYTES, path: Path | None = None) -> dict[str, ServedTable]:
    """Served tables (by module path) for the `formats` entries, their parts popped from `state` (the tensors
    of the safetensors file `path`, if given, whose rows are then read from the file); a table's missing part is
    a ValueError naming the tensor."""
    tables = {}
    for name, fmt in formats.items():
        keys = [f"{name}.{p}" for p in part_names(fmt)]
        absent = [k for k in keys if k not in state]
        if absent:
            raise ValueError(f"tensor {absent[0]!r}: a {fmt} table {name!r} needs it and the weights lack it")
        files = None if path is None else {p: FileRows(path, k) for p, k in zip(part_names(fmt), keys)}
        tables[name] = served_table({p: state.pop(k) for p, k in zip(part_names(fmt), keys)}, fmt,
                                    hashed.get(name, False), cache_bytes, files)
    return tables


def embedding_stats(model: nn.Module) -> dict[str, dict]:
    """Each served table's stats by module path (empty for a model with only trainable tables)."""
    return {name: m.stats() for name, m in model.named_modules() if isinstance(m, ServedTable)}
