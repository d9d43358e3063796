"""Datasets: the MovieLens-1M reader, the synthetic generator and ``load_dataset`` for specs."""

from __future__ import annotations

from pathlib import Path

from grinfer.data.errors import DataFormatError
from grinfer.data.movielens import read_movielens
from grinfer.data.synthetic import generate_synthetic
from grinfer.data.types import Dataset, ItemCatalog, UserTimeline

_SYNTHETIC_KEYS = {"users": "num_users", "items": "num_items", "events": "mean_events", "seed": "seed"}


def load_dataset(spec: str) -> Dataset:
    """Load a dataset from a spec string.

    ``"synthetic"`` gives :func:`generate_synthetic` defaults; ``"synthetic:users=500,items=800,
    events=40,seed=3"`` overrides any subset of those keys (integers). Anything else is a path to a
    MovieLens-1M directory (use ``./synthetic`` for a directory of that name).
    """
    name, sep, options = spec.partition(":")
    if name == "synthetic":
        return generate_synthetic(**_parse_synthetic_options(options if sep else ""))
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"dataset directory not found: {path} (expected a MovieLens-1M directory)")
    return read_movielens(path)


def _parse_synthetic_options(options: str) -> dict[str, int]:
    kwargs: dict[str, int] = {}
    for entry in filter(None, (e.strip() for e in options.split(","))):
        key, eq, value = (part.strip() for part in entry.partition("="))
        if not eq:
            raise ValueError(f"synthetic option {entry!r} is not key=value")
        if key not in _SYNTHETIC_KEYS:
            raise ValueError(f"unknown synthetic option {key!r}; expected one of {sorted(_SYNTHETIC_KEYS)}")
        if _SYNTHETIC_KEYS[key] in kwargs:
            raise ValueError(f"synthetic option {key!r} given twice")
        try:
            kwargs[_SYNTHETIC_KEYS[key]] = int(value)
        except ValueError:
            raise ValueError(f"synthetic option {key!r} must be an integer, got {value!r}") from None
    return kwargs


__all__ = [
    "DataFormatError",
    "Dataset",
    "ItemCatalog",
    "UserTimeline",
    "generate_synthetic",
    "load_dataset",
    "read_movielens",
]
