"""The inference engine: paged per-user KV cache, continuous batching, backends, the Engine facade."""

from grinfer.engine.core import EngineCore
from grinfer.engine.engine import Engine
from grinfer.engine.request import (
    ContextTooLarge,
    DeadlineExceeded,
    EngineError,
    Overloaded,
    RankRequest,
    RankResult,
)

__all__ = ["ContextTooLarge", "DeadlineExceeded", "Engine", "EngineCore", "EngineError", "Overloaded",
           "RankRequest", "RankResult"]
