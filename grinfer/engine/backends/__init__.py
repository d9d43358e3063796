"""Execution backends: one interface, picked by name; every backend is checked against `eager`."""

from __future__ import annotations

from grinfer.engine.backends.aoti import AotiBackend
from grinfer.engine.backends.base import Backend
from grinfer.engine.backends.compiled import CompiledBackend
from grinfer.engine.backends.eager import EagerBackend
from grinfer.engine.backends.fused import FusedBackend

BACKENDS: dict[str, type[Backend]] = {"eager": EagerBackend, "compiled": CompiledBackend, "fused": FusedBackend,
                                      "aoti": AotiBackend}


def make_backend(name: str, model, config=None) -> Backend:
    """The backend called `name` over `model` (with the engine's config, if any); unknown names list the
    available ones."""
    try:
        return BACKENDS[name](model, config)
    except KeyError:
        raise ValueError(f"backend: unknown backend {name!r}; choose one of {', '.join(BACKENDS)}") from None


__all__ = ["BACKENDS", "Backend", "EagerBackend", "make_backend"]
