"""MTGR / HSTU model modules and checkpoints (no batching or cache logic here)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from grinfer.config import ModelConfig

if TYPE_CHECKING:
    from torch import nn

    from grinfer.model.hstu import HSTURetrieval
    from grinfer.model.mtgr import MTGR


def build_model(cfg: ModelConfig, tables: Mapping[str, nn.Module] | None = None) -> MTGR | HSTURetrieval:
    """A fresh model for the config: MTGR for kind 'mtgr', HSTURetrieval for kind 'hstu'; `tables` gives
    served sparse tables by module path instead of fresh trainable ones (model.tables)."""
    from grinfer.model.hstu import HSTURetrieval
    from grinfer.model.mtgr import MTGR

    return MTGR(cfg, tables) if cfg.kind == "mtgr" else HSTURetrieval(cfg, tables)


__all__ = ["ModelConfig", "build_model"]
