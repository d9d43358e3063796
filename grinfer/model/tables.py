"""The sparse embedding tables of a model (the id-keyed lookups that go through grinfer.embedding) and how
they are built: trainable nn.Embedding modules by default, or the served tables a checkpoint loader
passes in (quantised, memory-mapped, cached)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from grinfer.config import ModelConfig
from grinfer.embedding.table import HashedEmbedding


@dataclass(frozen=True)
class TableShape:
    """One sparse table: rows x dim; hashed = its ids are hashed into the rows (raw ids, any range)."""

    rows: int
    dim: int
    hashed: bool = False


def table_shapes(cfg: ModelConfig) -> dict[str, TableShape]:
    """The model's sparse tables by module path (its checkpoint tensors are `<path>.weight`, or the row
    format's parts for a quantised checkpoint)."""
    items = TableShape(cfg.item_table_rows or cfg.num_items + 1,
                       cfg.item_emb_dim if cfg.kind == "mtgr" else cfg.d_model, cfg.item_table_rows is not None)
    if cfg.kind == "hstu":
        return {"item_emb": items}
    s = cfg.side_emb_dim
    out = {"item_emb": items, "year_emb": TableShape(cfg.num_year_buckets, s),
           "action_emb": TableShape(cfg.num_actions, s), "gap_emb": TableShape(cfg.num_time_buckets, s)}
    out.update({f"profile_emb.{i}": TableShape(c, cfg.item_emb_dim) for i, c in enumerate(cfg.profile_cardinalities)})
    return out


def make_table(name: str, shape: TableShape, tables: Mapping[str, nn.Module] | None) -> nn.Module:
    """The table `name`: the one given in `tables`, else a fresh trainable one of this shape."""
    if tables and name in tables:
        return tables[name]
    return HashedEmbedding(shape.rows, shape.dim) if shape.hashed else nn.Embedding(shape.rows, shape.dim)
