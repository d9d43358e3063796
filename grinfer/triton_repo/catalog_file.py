"""The item catalogue as one .npz file inside the repository (no store or dataset needed at serve time)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from grinfer.data.types import ItemCatalog


def save_catalog(catalog: ItemCatalog, path: Path) -> None:
    """Write `catalog` (ids, side features, titles) to `path` (.npz)."""
    np.savez(path, genres=catalog.genres, year_bucket=catalog.year_bucket, raw_ids=catalog.raw_ids,
             titles=np.array(catalog.titles, dtype=str), genre_names=np.array(catalog.genre_names, dtype=str))


def load_catalog(path: Path) -> ItemCatalog:
    """The catalogue `save_catalog` wrote."""
    with np.load(path, allow_pickle=False) as f:
        return ItemCatalog(genres=f["genres"], year_bucket=f["year_bucket"].astype(np.int64),
                           titles=[str(t) for t in f["titles"]], genre_names=[str(g) for g in f["genre_names"]],
                           raw_ids=f["raw_ids"].astype(np.int64))
