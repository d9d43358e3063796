"""MTGR / HSTU model modules and checkpoints (no batching or cache logic here)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from grinfer.config import ModelConfig

if TYPE_CHECKING:
    from grinfer.model.hstu import HSTURetrieval
    from grinfer.model.mtgr import MTGR


def build_model(cfg: ModelConfig) -> MTGR | HSTURetrieval:
    """A fresh model for the config: MTGR for kind 'mtgr', HSTURetrieval for kind 'hstu'."""
    from grinfer.model.hstu import HSTURetrieval
    from grinfer.model.mtgr import MTGR

    return MTGR(cfg) if cfg.kind == "mtgr" else HSTURetrieval(cfg)


__all__ = ["ModelConfig", "build_model"]
